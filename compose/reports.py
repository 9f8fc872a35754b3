"""Reading evaluation results: forgetting rows, markdown tables, plots.

Plots use matplotlib's ``Agg`` backend (no display needed) and write PNGs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["forgetting_report", "format_table", "plot_history", "plot_perplexity", "plot_forgetting"]


def _ppl(value: Any) -> float:
    if isinstance(value, Mapping):
        return float(value["perplexity"])
    return float(value)


def forgetting_report(
    before: Mapping[str, Any], after: Mapping[str, Any], *, domain: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Perplexity change per named set between two :func:`perplexity_report` results (or ``{name: ppl}``).

    Sets named in ``domain`` are labelled ``"domain"`` (where training should help), the
    others ``"general"`` (where it should not hurt: the forgetting). Rows hold ``set``,
    ``kind``, ``before``, ``after``, ``change`` (after - before) and ``relative``
    (after / before - 1). Only sets present in both are compared.
    """
    domain = set(domain)
    rows = []
    for name in before:
        if name not in after:
            continue
        b, a = _ppl(before[name]), _ppl(after[name])
        rows.append(
            {
                "set": name,
                "kind": "domain" if name in domain else "general",
                "before": b,
                "after": a,
                "change": a - b,
                "relative": a / b - 1 if b else float("nan"),
            }
        )
    return rows


def format_table(rows: list[Mapping[str, Any]], *, digits: int = 3) -> str:
    """A markdown table of ``rows`` (dicts with the same keys); floats rounded to ``digits``."""
    if not rows:
        return ""
    keys = list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(
    history: list[Mapping[str, float]],
    path: str | os.PathLike,
    *,
    keys: Iterable[str] = ("loss", "eval_loss"),
    title: str | None = None,
) -> Path:
    """Line plot of ``keys`` against ``step`` from a ``fit`` history (``Composer.history``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        points = [(h["step"], h[key]) for h in history if h.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_perplexity(
    reports: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, *, title: str | None = None, log: bool = True
) -> Path:
    """Grouped bars: one group per eval set, one bar per model (``{model_label: perplexity_report}``)."""
    plt = _pyplot()
    labels = list(reports)
    sets: list[str] = []
    for rep in reports.values():
        sets += [s for s in rep if s not in sets]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(sets) * max(1, len(labels)) / 2 + 2), 4))
    width = 0.8 / max(1, len(labels))
    for k, label in enumerate(labels):
        xs = [i + k * width for i, s in enumerate(sets) if s in reports[label]]
        ys = [_ppl(reports[label][s]) for s in sets if s in reports[label]]
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(sets))], sets)
    ax.set_ylabel("perplexity")
    if log:
        ax.set_yscale("log")
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_forgetting(rows: list[Mapping[str, Any]], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Horizontal bars of relative perplexity change per set (from :func:`forgetting_report`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 1 + 0.5 * max(1, len(rows))))
    names = [f"{r['set']} ({r['kind']})" for r in rows]
    values = [100 * r["relative"] for r in rows]
    colors = ["tab:green" if v <= 0 else "tab:red" for v in values]
    ax.barh(names, values, color=colors)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("perplexity change (%)")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
