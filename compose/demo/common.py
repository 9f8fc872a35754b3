"""Helpers shared by the demo's experiments: small models, fit options, tables, plots."""

from __future__ import annotations

from typing import Any

import torch


# ============================================================================ helpers
def _log(msg: str) -> None:
    print(msg, flush=True)


def _scratch_model(family: str, vocab: int, hidden: int, layers: int, heads: int, positions: int, seed: int):
    """A freshly initialised model to train from scratch (transformers' own init, MLP 4x hidden, no biases)."""
    from transformers import AutoModelForCausalLM

    from ..testing import tiny_config

    cfg = tiny_config(
        family,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=heads,
        vocab=vocab,
        positions=positions,
        tie=False if family == "llama" else None,
        ffn=4,
        bias=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _fit_options(steps: int, lr: float, batch_size: int, seq_len: int, seed: int, **kw: Any) -> dict[str, Any]:
    return dict(
        max_steps=steps,
        learning_rate=lr,
        batch_size=batch_size,
        seq_len=seq_len,
        warmup_ratio=0.05,
        weight_decay=0.0,
        progress=False,
        log_every=max(1, steps // 10),
        report_to=None,
        seed=seed,
        **kw,
    )


def _n_trainable(c) -> int:
    return sum(p.numel() for p in c.trainable_parameters().values())


def _markdown(rows: list[dict[str, Any]], digits: int = 2) -> str:
    from ..evaluate import format_table

    return format_table(rows, digits=digits)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
