"""Helpers shared by the demo's experiments: small models, fit options, tables, plots."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
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


def plot_bars(rows: list[dict[str, Any]], metrics: list[str], title: str, path) -> Any:
    """One panel per metric, one bar per row (``row["model"]``), the value written on each bar."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4))
    for ax, metric in zip(axes if len(metrics) > 1 else [axes], metrics):
        names = [r["model"] for r in rows]
        values = [r[metric] for r in rows]
        bars = ax.bar(range(len(rows)), values, color=[f"C{i}" for i in range(len(rows))])
        ax.bar_label(bars, fmt="%.4g", fontsize=7)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
        low, high = min(values), max(values)
        if metric.endswith("bpb") and high > 0:  # bits per byte differ in the 2nd decimal: zoom in
            ax.set_ylim(low - 0.15 * (high - low + 0.01), high + 0.15 * (high - low + 0.01))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report_run(out, name: str, metrics: list[str], title: str) -> dict[str, Any]:
    """A finished run's table (printed) and bar plot (``name.png`` beside ``name.json``), from its JSON."""
    import json
    from pathlib import Path

    out = Path(out)
    result = json.loads((out / f"{name}.json").read_text())
    plot_bars(result["rows"], metrics, title, out / f"{name}.png")
    _log(_markdown(result["rows"], digits=4))
    return result


SETTINGS_FILE = "settings.json"


class OtherSettings(ValueError):
    """A results directory holds results made with other settings."""


def bind_out(out, cfg, free: tuple[str, ...] = ("threads",)) -> None:
    """Tie the results directory ``out`` to the settings of ``cfg`` (every field but ``free``).

    The real-model drivers skip a stage whose result is already in ``out``; run again with
    another seed or step count, they would report the old result under the new settings. The
    first run writes ``settings.json``; a later one with other settings is refused, naming
    each difference."""
    out = Path(out)
    wanted = json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in free}))
    path = out / SETTINGS_FILE
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(wanted, indent=1, sort_keys=True))
        return
    have = json.loads(path.read_text())
    diff = [
        f"{k}: {have.get(k)!r} there, {wanted.get(k)!r} now"
        for k in sorted({*have, *wanted} - set(free))
        if have.get(k) != wanted.get(k)
    ]
    if diff:
        raise OtherSettings(
            f"{out} holds results made with other settings ({'; '.join(diff)}); "
            "give another --out for these settings, or the same settings to continue there"
        )
