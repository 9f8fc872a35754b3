"""The demo: both papers' headline experiments, from scratch, on a CPU, in minutes.

    python -m compose.demo                 # ~6-10 minutes on 2 CPU cores
    python -m compose.demo --quick         # ~1 minute smoke run (smaller models, fewer steps)
    python -m compose.demo --only calm     # or --only block_expand
    python -m compose.demo --out runs/demo

Everything is trained here, on data the machine already has; nothing is downloaded.

1. **Block-expansion forgetting** (LLaMA Pro, Table/ablation shape). A small byte-level
   LLaMA is pretrained on English (the standard library's docstrings), then adapted to
   Python code (the standard library's code) by ``block_expand`` (interleave / top /
   bottom), ``full`` fine-tuning and ``lora``. Reported: domain (code) perplexity gain
   and general (English) perplexity change.
2. **CALM key-value arithmetic** (CALM, Table 1). m_A memorises ``key -> value``; the
   anchor m_B does arithmetic; the composition trains on expressions over 20% of the
   keys and is scored (exact match) on expressions over the held-out 80%.

Results go to ``--out`` as ``results.json`` plus one PNG per experiment, and tables are
printed. Seeds are fixed; data are generated or read in sorted order.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

__all__ = ["ForgettingConfig", "KVConfig", "run_forgetting", "run_kv", "main"]


# ============================================================================ configs
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


@dataclass
class KVConfig:
    """Sizes and schedules of the CALM key-value arithmetic experiment."""

    num_keys: int = 512
    num_values: int = 32
    aug_hidden: int = 64
    aug_layers: int = 2
    aug_family: str = "llama"
    """m_A's family (``llama`` or ``gpt2``, whose absolute position embeddings were tried as a
    way for the position-free cross-attention to tell the two keys of ``k_i - k_j`` apart)."""
    anchor_hidden: int = 128
    anchor_layers: int = 4
    heads: int = 4
    aug_steps: int = 300
    aug_lr: float = 3e-3
    anchor_steps: int = 800
    anchor_lr: float = 3e-3
    calm_steps: int = 800
    calm_lr: float = 1e-2
    batch_size: int = 128
    connections: list = field(default_factory=lambda: [[1, 0]])
    calm_heads: int | None = None
    calm_options: dict = field(default_factory=lambda: {"norm": True})
    """More ``calm`` options (``norm``, ``gate``)."""
    numeric_mix: float = 0.3
    """Fraction of numeric (key-free) expressions mixed into the composition data."""
    eval_n: int = 1000
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
QUICK_KV = KVConfig(
    num_keys=64,
    num_values=8,
    aug_hidden=32,
    anchor_hidden=32,
    anchor_layers=2,
    aug_steps=40,
    anchor_steps=40,
    calm_steps=40,
    eval_n=200,
)


# ============================================================================ helpers
def _log(msg: str) -> None:
    print(msg, flush=True)


def _llama(vocab: int, hidden: int, layers: int, heads: int, positions: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=positions,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def _gpt2(vocab: int, hidden: int, layers: int, heads: int, positions: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).eval()


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
    from .evaluate import format_table

    return format_table(rows, digits=digits)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ============================================================================ 1. forgetting
def run_forgetting(cfg: ForgettingConfig, out: Path) -> dict[str, Any]:
    """Pretrain on English, adapt to code with each strategy, measure both perplexities."""
    from . import Composer
    from .tasks.corpora import ByteCodec, code_corpus, english_corpus, split_docs

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
    from .strategies import STRATEGIES

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


# ============================================================================ 2. CALM
def train_augment(cfg: KVConfig, task) -> tuple[Any, float]:
    """m_A: trained on ``k v k v ...`` over *all* keys, so at a key token it holds that key's value."""
    from . import Composer
    from .tasks.kv_arithmetic import memory_accuracy

    rows = task.memory_records(max(cfg.batch_size, 5000), pairs=16, keys="all", seed=1)
    if cfg.aug_family == "gpt2":
        aug = _gpt2(task.vocab_size, cfg.aug_hidden, cfg.aug_layers, cfg.heads, 64, cfg.seed + 1)
    else:
        aug = _llama(task.vocab_size, cfg.aug_hidden, cfg.aug_layers, cfg.heads, 64, cfg.seed + 1)
    c = Composer(aug, strategy="full", copy_model=False)
    c.fit(rows, **_fit_options(cfg.aug_steps, cfg.aug_lr, cfg.batch_size // 4, 33, cfg.seed, packing=False))
    aug = c.model.requires_grad_(False)
    return aug, memory_accuracy(aug, task.memory_records(200, pairs=16, keys="heldout", seed=2))


def train_anchor(cfg: KVConfig, task) -> Any:
    """m_B: arithmetic on numbers only, with one shared embedding for every key (it knows none)."""
    from . import Composer

    anchor = task.blind_to_keys_(
        _llama(task.vocab_size, cfg.anchor_hidden, cfg.anchor_layers, cfg.heads, 64, cfg.seed + 2)
    )
    c = Composer(anchor, strategy="full", copy_model=False)
    c.fit(
        task.records("numeric", 20_000, seed=1),
        **_fit_options(cfg.anchor_steps, cfg.anchor_lr, cfg.batch_size, 7, cfg.seed, packing=False),
    )
    return c.model.requires_grad_(False)


def train_calm(cfg: KVConfig, task, anchor, aug):
    """CALM on expressions over the training keys (20%), plus numeric ones to keep arithmetic."""
    from . import Composer

    n_rows = 20_000
    n_num = int(cfg.numeric_mix * n_rows)
    n_kv = n_rows - n_num
    train = (
        task.records("kv_arith", int(0.8 * n_kv), keys="train", seed=3)
        + task.records("kv_subst", n_kv - int(0.8 * n_kv), keys="train", seed=4)
        + task.records("numeric", n_num, seed=5)
    )
    calm = Composer(
        anchor, aug, strategy="calm", connections=cfg.connections, num_heads=cfg.calm_heads, **cfg.calm_options
    )
    calm.fit(train, **_fit_options(cfg.calm_steps, cfg.calm_lr, cfg.batch_size, 7, cfg.seed, packing=False))
    return calm


def run_kv(cfg: KVConfig, out: Path) -> dict[str, Any]:
    """Train m_A (memory) and m_B (arithmetic) from scratch, compose them with CALM, score all three."""
    from .tasks.kv_arithmetic import KVArithmetic, answer_accuracy

    t0 = time.perf_counter()
    task = KVArithmetic(num_keys=cfg.num_keys, num_values=cfg.num_values, seed=cfg.seed)

    t = time.perf_counter()
    aug, mem_acc = train_augment(cfg, task)
    _log(
        f"[calm] m_A {cfg.aug_layers}x{cfg.aug_hidden} memorised {mem_acc:.1%} of values ({time.perf_counter() - t:.0f}s)"
    )
    probe = _probe(task, aug)
    _log(
        "[calm] linear probe of the value at the key token, held-out keys, by m_A layer: "
        + ", ".join(f"{k}: {v:.0%}" for k, v in probe.items())
    )
    t = time.perf_counter()
    anchor = train_anchor(cfg, task)
    num_eval = task.records("numeric", cfg.eval_n, seed=99)
    _log(
        f"[calm] m_B {cfg.anchor_layers}x{cfg.anchor_hidden} numeric arithmetic "
        f"{answer_accuracy(anchor, num_eval):.1%} ({time.perf_counter() - t:.0f}s)"
    )
    t = time.perf_counter()
    calm = train_calm(cfg, task, anchor, aug)
    n_calm = _n_trainable(calm)
    _log(f"[calm] composition ({n_calm:,} trainable parameters) trained in {time.perf_counter() - t:.0f}s")

    evals = {
        "KV-substitution": task.records("kv_subst", cfg.eval_n, keys="heldout", seed=100),
        "numeric arithmetic": num_eval,
        "KV-arithmetic": task.records("kv_arith", cfg.eval_n, keys="heldout", seed=101),
        "KV-arithmetic (training keys)": task.records("kv_arith", cfg.eval_n, keys="train", seed=102),
        "key first: k + n, k - n": task.records("kv_first", cfg.eval_n, keys="heldout", seed=103),
        "key second: n + k, n - k": task.records("kv_second", cfg.eval_n, keys="heldout", seed=104),
    }
    models = {"m_A": aug, "m_B": anchor, "CALM": calm.model}
    rows = []
    for name, recs in evals.items():
        row = {"task": name}
        for label, model in models.items():
            row[label] = 100 * answer_accuracy(model, recs)
        rows.append(row)
    # Greedy generation through the composed model's own decoding loop, as a user would call it.
    examples = []
    for rec in evals["KV-arithmetic"][:5]:
        prompt = torch.tensor([rec["input_ids"][: rec["answer_pos"]]])
        gen = calm.generate(prompt, max_new_tokens=2, do_sample=False)[0].tolist()
        examples.append(
            {
                "prompt": task.decode(prompt[0]),
                "generated": task.decode(gen[prompt.shape[1] :]),
                "answer": task.decode([rec["input_ids"][rec["answer_pos"]]]),
            }
        )
    _plot_kv(rows, out / "kv_arithmetic.png")
    return {
        "config": asdict(cfg),
        "rows": rows,
        "m_A_memorised_%": 100 * mem_acc,
        "probe_heldout_%": {k: 100 * v for k, v in probe.items()},
        "calm_trainable": n_calm,
        "calm_history": calm.history,
        "examples": examples,
        "vocab": {
            "keys": cfg.num_keys,
            "values": cfg.num_values,
            "train_keys": len(task.train_keys),
            "heldout_keys": len(task.heldout_keys),
            "vocab_size": task.vocab_size,
        },
        "seconds": time.perf_counter() - t0,
    }


@torch.no_grad()
def _probe(task, aug) -> dict[str, float]:
    """Ridge-regression probe: value one-hot from m_A's layer outputs at ``bos k``, held-out keys."""
    ids = torch.tensor([[1, k] for k in task.key_ids])
    hs = aug.base_model(input_ids=ids, output_hidden_states=True).hidden_states
    values = torch.tensor(task.values)
    y = torch.nn.functional.one_hot(values, task.num_values).float()
    tr, ho = torch.tensor(task.train_keys), torch.tensor(task.heldout_keys)
    out = {}
    for layer, h in enumerate(hs[1:]):
        x = torch.cat([h[:, 1], torch.ones(len(h), 1)], 1)
        a = x[tr]
        w = torch.linalg.solve(a.T @ a + 1e-2 * torch.eye(a.shape[1]), a.T @ y[tr])
        out[f"layer {layer}"] = float(((x[ho] @ w).argmax(1) == values[ho]).float().mean())
    return out


def _plot_kv(rows: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    labels = ["m_A", "m_B", "CALM"]
    colors = {"m_A": "tab:orange", "m_B": "tab:blue", "CALM": "tab:green"}
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.26
    for k, label in enumerate(labels):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        ys = [r[label] for r in rows]
        bars = ax.bar(xs, ys, width, label=label, color=colors[label])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(rows)), [r["task"] for r in rows], fontsize=8)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 105)
    ax.legend()
    ax.set_title("CALM key-value arithmetic (keys held out from the composition's training)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================ main
def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m compose.demo", description=__doc__.split("\n\n")[0])
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
