"""Experiment 2: CALM key-value arithmetic (CALM, Table 1)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .common import _fit_options, _log, _n_trainable, _pyplot, _scratch_model


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
    anchor_steps: int = 1200
    anchor_lr: float = 3e-3
    operand_mix: tuple[float, float] | None = (0.3, 0.3)
    """m_B trains on blended operands (probability, largest blend weight; ``KVArithmetic.mix_operands``)
    so that its input space is smooth between numbers; ``None``: plain training (then the
    composition cannot find its way into m_B's input, see docs/results.md)."""
    calm_steps: int = 2000
    calm_lr: float = 3e-3
    batch_size: int = 128
    """m_B's batch (m_A's is a quarter of it)."""
    calm_batch_size: int = 64
    connections: list = field(default_factory=lambda: [[1, "input"]])
    """m_A's last layer into the input of m_B's first block: the injected vector must live in
    m_B's embedding space, where ``emb(KEY) + f(h_A) ~= emb(v)`` lets m_B's own arithmetic run.
    Its output is scaled to m_B's embedding RMS (``out_scale`` default)."""
    calm_heads: int | None = None
    calm_options: dict = field(default_factory=lambda: {"norm": True, "window": 1, "null_kv": True})
    """More ``calm`` options. ``window=1``: each m_B token reads only its own position in m_A (the
    two keys of ``k_i - k_j`` are otherwise indistinguishable to the position-free cross-attention);
    ``null_kv``: a query may read nothing, so number tokens are left alone."""
    calm_mix: dict = field(
        default_factory=lambda: {"kv_arith": 0.3, "kv_first": 0.15, "kv_second": 0.15, "numeric": 0.4}
    )
    """Composition data: fraction of each record kind (keys always from the 20% training keys).
    No ``kv_subst``: ``k = v`` can be solved by writing the answer at ``=`` (a shortcut that does
    not transfer to arithmetic); one-key ``k op n`` / ``n op k`` rows cannot."""
    calm_rows: int = 20_000
    eval_n: int = 1000
    seed: int = 0


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


# ============================================================================ 2. CALM
def train_augment(cfg: KVConfig, task) -> tuple[Any, float]:
    """m_A: trained on ``k v k v ...`` over *all* keys, so at a key token it holds that key's value."""
    from .. import Composer
    from ..tasks.kv_arithmetic import memory_accuracy

    rows = task.memory_records(max(cfg.batch_size, 5000), pairs=16, keys="all", seed=1)
    aug = _scratch_model(cfg.aug_family, task.vocab_size, cfg.aug_hidden, cfg.aug_layers, cfg.heads, 64, cfg.seed + 1)
    c = Composer(aug, strategy="full", copy_model=False)
    c.fit(rows, **_fit_options(cfg.aug_steps, cfg.aug_lr, cfg.batch_size // 4, 33, cfg.seed, packing=False))
    aug = c.model.requires_grad_(False)
    return aug, memory_accuracy(aug, task.memory_records(200, pairs=16, keys="heldout", seed=2))


def train_anchor(cfg: KVConfig, task) -> Any:
    """m_B: arithmetic on numbers only, with one shared embedding for every key (it knows none)."""
    from .. import Composer

    anchor = task.blind_to_keys_(
        _scratch_model("llama", task.vocab_size, cfg.anchor_hidden, cfg.anchor_layers, cfg.heads, 64, cfg.seed + 2)
    )
    c = Composer(anchor, strategy="full", copy_model=False)
    handle = task.mix_operands(c.model, *cfg.operand_mix) if cfg.operand_mix else None
    try:
        c.fit(
            task.records("numeric", 20_000, seed=1),
            **_fit_options(cfg.anchor_steps, cfg.anchor_lr, cfg.batch_size, 7, cfg.seed, packing=False),
        )
    finally:
        if handle is not None:
            handle.remove()
    return c.model.requires_grad_(False)


def train_calm(cfg: KVConfig, task, anchor, aug):
    """CALM on expressions over the training keys (20%), plus numeric ones to keep arithmetic."""
    from .. import Composer

    train = []
    for seed, (kind, frac) in enumerate(cfg.calm_mix.items(), start=3):
        train += task.records(kind, int(frac * cfg.calm_rows), keys="train", seed=seed)
    calm = Composer(
        anchor, aug, strategy="calm", connections=cfg.connections, num_heads=cfg.calm_heads, **cfg.calm_options
    )
    calm.fit(train, **_fit_options(cfg.calm_steps, cfg.calm_lr, cfg.calm_batch_size, 7, cfg.seed, packing=False))
    return calm


def run_kv_in_process(cfg: KVConfig, out: Path, threads: int) -> dict[str, Any]:
    """:func:`run_kv` with ``threads`` torch threads (the entry point of the demo's second process)."""
    torch.set_num_threads(threads)
    return run_kv(cfg, out)


def run_kv(cfg: KVConfig, out: Path) -> dict[str, Any]:
    """Train m_A (memory) and m_B (arithmetic) from scratch, compose them with CALM, score all three."""
    from ..tasks.kv_arithmetic import KVArithmetic, answer_accuracy

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
    ax.set_xticks(range(len(rows)), [r["task"] for r in rows], fontsize=8, rotation=15, ha="right")
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 105)
    ax.legend()
    ax.set_title("CALM key-value arithmetic (keys held out from the composition's training)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
