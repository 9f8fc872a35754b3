"""Experiment 1: block expansion vs fine-tuning on a domain shift (LLaMA Pro's forgetting claim).

The base model is pretrained on English plus a small share of Python code (from modules
that the adaptation and evaluation never see), then adapted to Python code by each
strategy in two settings: pure code (the paper's setup) and code with a share of the
pretraining English replayed. Every strategy gets the same data and the same steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .common import _fit_options, _log, _n_trainable, _pyplot, _scratch_model


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
    code_chars: int = 1_000_000
    """Python code characters read (whole modules); every 10th module is held out."""
    eval_chars: int = 30_000
    """Cap on each held-out set."""
    pretrain_code_share: float = 0.1
    """Share of the pretraining characters that are Python code, from modules disjoint from
    the adaptation and held-out ones (every 5th remaining module), so the base model has seen
    some code as LLaMA-2 had (0: English only)."""
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    adapt_steps: int = 80
    replay: float = 0.4
    """Share of the adaptation characters, in the "replay" setting, that are English from the
    pretraining set (the "code only" setting, the paper's, always runs too; 0: skip replay).
    docs/results.md reports 25%, 40% and 50%."""
    new_blocks: int = 2
    lora_r: int = 16
    lrs: dict[str, Any] = field(
        default_factory=lambda: {"full": 3e-3, "lora": 1e-2, "block_expand": 1e-2},
    )
    """Adaptation learning rate per strategy; a tuple is a grid: each value is tried and the
    one with the largest code gain kept (per method and setting; never chosen by forgetting)."""
    placements: tuple[str, ...] = ("interleave", "top", "bottom")
    new_block_lora_r: int = 0
    """Rank of an optional row "block_expand + LoRA on new blocks" (the first placement, adapters on
    every linear layer of the copies, alpha = 2 r); 0 skips it. Its learning rate is
    ``lrs["block_expand_lora"]`` (default: ``lrs["block_expand"]``). bench/forgetting_lora.py runs it."""
    seed: int = 0


QUICK_FORGETTING = ForgettingConfig(
    hidden=64,
    layers=2,
    seq_len=64,
    general_chars=200_000,
    code_chars=300_000,
    eval_chars=10_000,
    pretrain_steps=60,
    adapt_steps=20,
    new_blocks=1,
    placements=("interleave",),
)

LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
"""The grid the default ``lrs`` were picked from (same for every strategy):
``ForgettingConfig(lrs={k: LR_GRID for k in ("full", "lora", "block_expand")})``."""


def _chars(docs: list[str]) -> int:
    return sum(map(len, docs))


def _take(docs: list[str], n_chars: int) -> list[str]:
    """The first ``n_chars`` characters of ``docs`` (the last document cut to fit)."""
    out, n = [], 0
    for d in docs:
        if n >= n_chars:
            break
        out.append(d[: n_chars - n])
        n += len(out[-1])
    return out


def split_code(docs: list[str], eval_chars: int, pretrain_chars: int) -> tuple[list[str], list[str], list[str]]:
    """Modules (documents) split three ways, no module in two parts: ``(pretrain, adapt, held_out)``.

    Every 10th module is held out (until ``eval_chars``), then every 5th remaining module goes
    to pretraining (until ``pretrain_chars``; cut documents lose their rest), the rest to adaptation.
    """
    from ..tasks.corpora import split_docs

    rest, held = split_docs(docs, max_eval_chars=eval_chars)
    if not pretrain_chars:
        return [], rest, held
    adapt, pretrain = split_docs(rest, eval_every=5, max_eval_chars=pretrain_chars)
    if _chars(pretrain) < pretrain_chars:
        raise ValueError(f"too little code for {pretrain_chars:,} pretraining characters: raise code_chars")
    return pretrain, adapt, held


# ============================================================================ 1. forgetting
def run_forgetting(cfg: ForgettingConfig, out: Path) -> dict[str, Any]:
    """Pretrain on English (+ a little code), adapt to code with each strategy, measure both perplexities."""
    from ..tasks.corpora import ByteCodec

    t0 = time.perf_counter()
    codec = ByteCodec()
    general_train, code_pretrain, code_train, sets = _corpora(cfg, codec, t0)
    anchor, before = _pretrain(cfg, codec, general_train + code_pretrain, sets)
    rows = [_before_row(before)]
    search: list[dict[str, Any]] = []
    for setting, docs in _settings(cfg, general_train, code_train):
        records = codec.records(docs)
        full_gain = None
        for strategy, label, options, lr_key in _runs(cfg):
            best = _best_lr(cfg, anchor, records, sets, before, (setting, strategy, label, options, lr_key), search)
            if strategy == "full":
                full_gain = best["domain_gain"]
            best["gain_vs_full_%"] = 100 * best["domain_gain"] / full_gain if full_gain else float("nan")
            rows.append(best)
            _log(
                f"[forgetting] {setting} / {label} (lr {best['lr']}): English {best['general_change_%']:+.2f}%, "
                f"code ppl {best['domain_ppl']:.3f} ({best['gain_vs_full_%']:.0f}% of full's gain) "
                f"in {best['seconds']:.0f}s"
            )
    result = {
        "config": asdict(cfg),
        "rows": rows,
        "notes": "domain_gain = log(ppl_before / ppl_after) on held-out Python code (nats per byte); "
        "general_change_% = relative change of held-out English perplexity; gain_vs_full_% compares with "
        "full fine-tuning in the same data setting.",
        "seconds": time.perf_counter() - t0,
    }
    if search:
        result["lr_search"] = search
    _plot_forgetting(rows, out / "forgetting.png")
    return result


def _corpora(cfg: ForgettingConfig, codec, t0: float) -> tuple[list[str], list[str], list[str], dict[str, Any]]:
    """English and Python documents: ``(general_train, code_pretrain, code_train, held-out sets)``."""
    from ..tasks.corpora import code_corpus, english_corpus, split_docs

    general_train, general_eval = split_docs(english_corpus(cfg.general_chars), max_eval_chars=cfg.eval_chars)
    share = cfg.pretrain_code_share
    want = round(share / (1 - share) * _chars(general_train)) if share > 0 else 0
    code_pretrain, code_train, code_eval = split_code(code_corpus(cfg.code_chars), cfg.eval_chars, want)
    sets = {"general": codec.records(general_eval), "domain": codec.records(code_eval)}
    _log(
        f"[forgetting] English: {_chars(general_train):,} train / {_chars(general_eval):,} held-out chars; "
        f"Python: {_chars(code_pretrain):,} pretraining / {_chars(code_train):,} adaptation / "
        f"{_chars(code_eval):,} held-out ({time.perf_counter() - t0:.0f}s)"
    )
    return general_train, code_pretrain, code_train, sets


def _perplexities(c, sets: dict[str, Any], cfg: ForgettingConfig) -> dict[str, float]:
    return {name: c.evaluate(data, seq_len=cfg.seq_len, batch_size=32)["perplexity"] for name, data in sets.items()}


def _pretrain(cfg: ForgettingConfig, codec, docs: list[str], sets: dict[str, Any]) -> tuple[Any, dict[str, float]]:
    """The base model, trained from scratch on ``docs`` and frozen, and its held-out perplexities."""
    from .. import Composer

    base = _scratch_model("llama", codec.vocab_size, cfg.hidden, cfg.layers, cfg.heads, cfg.seq_len, cfg.seed)
    pre = Composer(base, strategy="full", copy_model=False)
    t = time.perf_counter()
    pre.fit(
        codec.records(docs), **_fit_options(cfg.pretrain_steps, cfg.pretrain_lr, cfg.batch_size, cfg.seq_len, cfg.seed)
    )
    anchor = pre.model
    anchor.requires_grad_(False)
    before = _perplexities(pre, sets, cfg)
    _log(
        f"[forgetting] pretrained {cfg.layers}x{cfg.hidden} on English + {100 * cfg.pretrain_code_share:.0f}% code in "
        f"{time.perf_counter() - t:.0f}s: English ppl {before['general']:.3f}, code ppl {before['domain']:.3f}"
    )
    return anchor, before


def _runs(cfg: ForgettingConfig) -> list[tuple[str, str, dict[str, Any], str]]:
    """The adaptations compared: ``(strategy, row label, strategy options, key of cfg.lrs)``."""
    runs: list[tuple[str, str, dict[str, Any], str]] = [("full", "full", {}, "full")]
    if "lora" in _strategies():
        runs.append(("lora", f"lora (r={cfg.lora_r})", {"r": cfg.lora_r, "alpha": 2.0 * cfg.lora_r}, "lora"))
    for placement in cfg.placements:
        runs.append(
            (
                "block_expand",
                f"block_expand {placement} (+{cfg.new_blocks})",
                {"num_blocks": cfg.new_blocks, "placement": placement},
                "block_expand",
            )
        )
    if cfg.new_block_lora_r:
        r = cfg.new_block_lora_r
        runs.append(
            (
                "block_expand",
                f"block_expand {cfg.placements[0]} (+{cfg.new_blocks}) + LoRA r={r} on new blocks",
                {"num_blocks": cfg.new_blocks, "placement": cfg.placements[0], "lora": {"r": r, "alpha": 2.0 * r}},
                "block_expand_lora" if "block_expand_lora" in cfg.lrs else "block_expand",
            )
        )
    return runs


def _settings(cfg: ForgettingConfig, general_train: list[str], code_train: list[str]) -> list[tuple[str, list[str]]]:
    """The adaptation data: code only, and (``cfg.replay``) code with English replayed."""
    settings = [("code only", code_train)]
    if cfg.replay > 0:
        replayed = _take(general_train, round(cfg.replay / (1 - cfg.replay) * _chars(code_train)))
        settings.append((f"code + {100 * cfg.replay:.0f}% English replay", code_train + replayed))
    return settings


def _before_row(before: dict[str, float]) -> dict[str, Any]:
    return {
        "data": "-",
        "method": "pretrained (before)",
        "lr": "-",
        "trainable": 0,
        "general_ppl": before["general"],
        "domain_ppl": before["domain"],
        "general_change_%": 0.0,
        "domain_gain": 0.0,
        "gain_vs_full_%": 0.0,
        "seconds": 0.0,
    }


def _best_lr(cfg, anchor, records, sets, before, run: tuple, search: list[dict[str, Any]]) -> dict[str, Any]:
    """Adapt ``anchor`` with each learning rate of the run's grid; the row with the largest code gain.

    With a grid of several rates every row is also appended to ``search``.
    """
    from .. import Composer

    setting, strategy, label, options, lr_key = run
    grid = cfg.lrs[lr_key]
    grid = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
    best = None
    for lr in grid:
        t = time.perf_counter()
        c = Composer(anchor, strategy=strategy, **options)
        n = _n_trainable(c)
        c.fit(records, **_fit_options(cfg.adapt_steps, lr, cfg.batch_size, cfg.seq_len, cfg.seed + 1))
        after = _perplexities(c, sets, cfg)
        del c
        gain = math.log(before["domain"]) - math.log(after["domain"])
        row = {
            "data": setting,
            "method": label,
            "lr": f"{lr:g}",
            "trainable": n,
            "general_ppl": after["general"],
            "domain_ppl": after["domain"],
            "general_change_%": 100 * (after["general"] / before["general"] - 1),
            "domain_gain": gain,
            "seconds": time.perf_counter() - t,
        }
        if len(grid) > 1:
            search.append(row)
            _log(
                f"[forgetting]   {setting} / {label} lr {lr:g}: code gain {gain:.4f} (English {row['general_change_%']:+.2f}%)"
            )
        if best is None or gain > best["domain_gain"]:
            best = row
    return best


def _strategies() -> set[str]:
    from ..strategies import STRATEGIES

    return set(STRATEGIES)


def _plot_forgetting(rows: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in rows if r["trainable"]]
    names = [r["method"] + (" + replay" if "replay" in r["data"] else "") for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.55 * len(rows) + 1.8), sharey=True)
    gains = [r["gain_vs_full_%"] for r in rows]
    axes[0].barh(names, gains, color="tab:blue")
    axes[0].axvline(80, color="gray", linestyle="--", linewidth=0.8)
    axes[0].set_xlabel("code perplexity gain, % of full fine-tuning's (same data; higher is better)")
    changes = [r["general_change_%"] for r in rows]
    axes[1].barh(names, changes, color=["tab:red" if v > 2 else "tab:green" for v in changes])
    axes[1].axvline(2, color="gray", linestyle="--", linewidth=0.8)
    axes[1].axvline(0, color="black", linewidth=0.8)
    axes[1].set_xlabel("English perplexity change, % (lower is better)")
    axes[0].invert_yaxis()
    fig.suptitle("Adapting a byte-level LM (English + a little code) to Python code: gain vs forgetting")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
