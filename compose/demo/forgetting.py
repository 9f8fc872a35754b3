"""Experiment 1: block expansion vs fine-tuning on a domain shift (LLaMA Pro's forgetting claim)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .common import _fit_options, _llama, _log, _n_trainable, _pyplot


@dataclass
class ForgettingConfig:
    """Sizes and schedules of the block-expansion forgetting experiment."""

    hidden: int = 96
    layers: int = 4
    heads: int = 4
    seq_len: int = 128
    batch_size: int = 16
    general_chars: int = 800_000
    """English characters read (docstrings); every 10th document is held out."""
    code_chars: int = 500_000
    """Python code characters read; every 10th document is held out."""
    eval_chars: int = 30_000
    """Cap on each held-out set."""
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    adapt_steps: int = 80
    new_blocks: int = 2
    lora_r: int = 16
    lrs: dict[str, float] = field(
        default_factory=lambda: {"full": 1e-3, "lora": 3e-3, "block_expand": 2e-3},
    )
    """Adaptation learning rate per strategy."""
    placements: tuple[str, ...] = ("interleave", "top", "bottom")
    seed: int = 0


QUICK_FORGETTING = ForgettingConfig(
    hidden=64,
    layers=2,
    seq_len=64,
    general_chars=200_000,
    code_chars=150_000,
    eval_chars=10_000,
    pretrain_steps=60,
    adapt_steps=20,
    new_blocks=1,
)


# ============================================================================ 1. forgetting
def run_forgetting(cfg: ForgettingConfig, out: Path) -> dict[str, Any]:
    """Pretrain on English, adapt to code with each strategy, measure both perplexities."""
    from .. import Composer
    from ..tasks.corpora import ByteCodec, code_corpus, english_corpus, split_docs

    t0 = time.perf_counter()
    codec = ByteCodec()
    general_train, general_eval = split_docs(english_corpus(cfg.general_chars), max_eval_chars=cfg.eval_chars)
    code_train, code_eval = split_docs(code_corpus(cfg.code_chars), max_eval_chars=cfg.eval_chars)
    sets = {"general": codec.records(general_eval), "domain": codec.records(code_eval)}
    _log(
        f"[forgetting] English: {sum(map(len, general_train)):,} train / {sum(map(len, general_eval)):,} held-out "
        f"chars; Python: {sum(map(len, code_train)):,} / {sum(map(len, code_eval)):,} ({time.perf_counter() - t0:.0f}s)"
    )

    def evaluate(c) -> dict[str, float]:
        return {name: c.evaluate(data, seq_len=cfg.seq_len, batch_size=32)["perplexity"] for name, data in sets.items()}

    base = _llama(codec.vocab_size, cfg.hidden, cfg.layers, cfg.heads, cfg.seq_len, cfg.seed)
    pre = Composer(base, strategy="full", copy_model=False)
    t = time.perf_counter()
    pre.fit(
        codec.records(general_train),
        **_fit_options(cfg.pretrain_steps, cfg.pretrain_lr, cfg.batch_size, cfg.seq_len, cfg.seed),
    )
    anchor = pre.model
    anchor.requires_grad_(False)
    before = evaluate(pre)
    _log(
        f"[forgetting] pretrained {cfg.layers}x{cfg.hidden} on English in {time.perf_counter() - t:.0f}s: "
        f"general ppl {before['general']:.3f}, code ppl {before['domain']:.3f}"
    )

    runs: list[tuple[str, str, dict[str, Any]]] = [("full", "full", {})]
    if "lora" in _strategies():
        runs.append(("lora", f"lora (r={cfg.lora_r})", {"r": cfg.lora_r, "alpha": 2.0 * cfg.lora_r}))
    for placement in cfg.placements:
        runs.append(
            (
                "block_expand",
                f"block_expand {placement} (+{cfg.new_blocks})",
                {"num_blocks": cfg.new_blocks, "placement": placement},
            )
        )
    code_records = codec.records(code_train)
    rows = [
        {
            "method": "pretrained (before)",
            "trainable": 0,
            "general_ppl": before["general"],
            "domain_ppl": before["domain"],
            "general_change_%": 0.0,
            "domain_gain": 0.0,
            "gain_vs_full_%": 0.0,
            "seconds": 0.0,
        }
    ]
    full_gain = None
    for strategy, label, options in runs:
        t = time.perf_counter()
        c = Composer(anchor, strategy=strategy, **options)
        n = _n_trainable(c)
        c.fit(
            code_records,
            **_fit_options(cfg.adapt_steps, cfg.lrs[strategy], cfg.batch_size, cfg.seq_len, cfg.seed + 1),
        )
        after = evaluate(c)
        gain = math.log(before["domain"]) - math.log(after["domain"])
        if strategy == "full":
            full_gain = gain
        row = {
            "method": label,
            "trainable": n,
            "general_ppl": after["general"],
            "domain_ppl": after["domain"],
            "general_change_%": 100 * (after["general"] / before["general"] - 1),
            "domain_gain": gain,
            "gain_vs_full_%": 100 * gain / full_gain if full_gain else float("nan"),
            "seconds": time.perf_counter() - t,
        }
        rows.append(row)
        _log(
            f"[forgetting] {label}: general {row['general_change_%']:+.2f}%, code ppl {after['domain']:.3f} "
            f"({row['gain_vs_full_%']:.0f}% of full's gain) in {row['seconds']:.0f}s"
        )
        del c
    result = {
        "config": asdict(cfg),
        "rows": rows,
        "notes": "domain_gain = log(ppl_before / ppl_after) on held-out Python code (nats per byte); "
        "general_change_% = relative change of held-out English perplexity.",
        "seconds": time.perf_counter() - t0,
    }
    _plot_forgetting(rows, out / "forgetting.png")
    return result


def _strategies() -> set[str]:
    from ..strategies import STRATEGIES

    return set(STRATEGIES)


def _plot_forgetting(rows: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in rows if r["trainable"]]
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.6 * len(rows) + 1.6), sharey=True)
    gains = [r["gain_vs_full_%"] for r in rows]
    axes[0].barh(names, gains, color="tab:blue")
    axes[0].axvline(80, color="gray", linestyle="--", linewidth=0.8)
    axes[0].set_xlabel("code perplexity gain, % of full fine-tuning's (higher is better)")
    changes = [r["general_change_%"] for r in rows]
    axes[1].barh(names, changes, color=["tab:red" if v > 2 else "tab:green" for v in changes])
    axes[1].axvline(2, color="gray", linestyle="--", linewidth=0.8)
    axes[1].axvline(0, color="black", linewidth=0.8)
    axes[1].set_xlabel("English perplexity change, % (lower is better)")
    axes[0].invert_yaxis()
    fig.suptitle("Adapting an English byte-level LM to Python code: gain vs forgetting")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
