"""`python -m compose.demo`: run the experiments, print the tables, write JSON + PNG."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import __doc__ as DEMO_DOC
from .common import _log, _markdown
from .forgetting import QUICK_FORGETTING, ForgettingConfig, run_forgetting
from .kv import QUICK_KV, KVConfig, run_kv


# ============================================================================ main
def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m compose.demo", description=DEMO_DOC.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="~1 minute smoke run: tiny models, few steps")
    p.add_argument("--only", choices=["calm", "block_expand"], help="run one experiment only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
        },
        "quick": args.quick,
    }
    if args.only in (None, "block_expand"):
        cfg = replace(QUICK_FORGETTING) if args.quick else ForgettingConfig()
        results["forgetting"] = run_forgetting(cfg, out)
        _log("\nBlock expansion vs fine-tuning (held-out perplexities; byte level)\n")
        _log(_markdown(results["forgetting"]["rows"]))
    if args.only in (None, "calm"):
        cfg = replace(QUICK_KV) if args.quick else KVConfig()
        results["kv_arithmetic"] = run_kv(cfg, out)
        _log("\nCALM key-value arithmetic (exact match %, held-out keys)\n")
        _log(_markdown(results["kv_arithmetic"]["rows"], digits=1))
    results["seconds"] = time.perf_counter() - t0
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    _log(f"\nwrote {out / 'results.json'} and PNGs in {out} ({results['seconds']:.0f}s)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
