"""The forgetting experiment with one more row: block expansion with LoRA on the new blocks.

Runs ``compose.demo.forgetting`` (pretrain a byte-level model on English plus a little
code, then adapt it to Python code) in the paper's setting (code only, no replay) with:
full fine-tuning, LoRA on the whole model, block expansion training the new blocks, and
block expansion with LoRA adapters on the new blocks only. Learning rates: the demo's,
and a grid for the new row, picked by code gain only (as the demo does). Usage::

    python bench/forgetting_lora.py                       # the demo's sizes, 1 thread
    python bench/forgetting_lora.py --quick               # smoke run, about a minute
    python bench/forgetting_lora.py --out bench/results/forgetting_lora_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from compose.demo.common import _markdown
from compose.demo.forgetting import LR_GRID, QUICK_FORGETTING, ForgettingConfig, run_forgetting

LORA_LRS = LR_GRID  # the grid the demo's own rates were picked from


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the demo's quick sizes (a smoke run)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank on the new blocks (alpha = 2 x rank)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = QUICK_FORGETTING if args.quick else ForgettingConfig()
    cfg = dataclasses.replace(
        base,
        replay=0.0,
        placements=base.placements[:1],
        new_block_lora_r=args.rank,
        lrs={**base.lrs, "block_expand_lora": LORA_LRS},
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_forgetting(cfg, Path(tmp))
    result["machine"] = {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    result["seconds"] = time.perf_counter() - t0
    cols = ("method", "lr", "trainable", "general_ppl", "domain_ppl", "general_change_%", "gain_vs_full_%", "seconds")
    print(_markdown([{k: r[k] for k in cols if k in r} for r in result["rows"]]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
