"""Experiment 2: CALM key-value arithmetic (CALM, Table 1)."""

from __future__ import annotations

import random
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
    operand_mix: tuple[float, float] | None = None
    """m_B trains on operands blended with another number (probability, largest blend weight;
    ``KVArithmetic.mix_operands``). Off: with ``key_mix`` and ``unknown_keys`` it is not needed,
    and it cost m_B up to 11 points of numeric accuracy (docs/results.md, section 2)."""
    key_mix: tuple[float, float] | None = (0.3, 0.9)
    """m_B trains on operands blended towards the shared key embedding (probability, largest
    weight; ``KVArithmetic.mix_operands(key_p=, key_max_weight=)``): it reads a number from a faint
    trace of it on top of the key embedding, so the straight path from a key to its value's
    embedding, the path a composition writing into m_B's input starts on, can be followed."""
    unknown_keys: float = 0.1
    """Rows of m_B's training with a key as an operand and a random value behind it
    (``KVArithmetic.unknown_records``), as a fraction of its numeric rows: m_B then answers a key
    with the uniform distribution over what it could be, instead of a confident wrong number,
    and the gradient at a key points towards the numbers."""
    calm_steps: int = 2000
    calm_lr: float = 1e-3
    """3e-3 fits two of three base seeds and oscillates on the third (docs/results.md)."""
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
    calm_fit: dict = field(default_factory=dict)
    """More :meth:`Composer.fit` options for the composition (schedule, clipping ...), over the demo's."""
    calm_seeds: tuple[int, ...] = (0,)
    """Composition seeds (initialisation of the connection and data order), each trained on the
    same m_A and m_B; the demo reports every one, their minimum and their mean. One by default,
    to keep the demo within its time budget (each more seed adds one composition's training);
    the spread over seeds and machines is measured by ``bench/kv_grid.py``."""
    eval_n: int = 1000
    seed: int = 0
    """Base seed: the key table, m_A and m_B (their initialisation and data order)."""


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

#: Evaluation sets of the CALM table, in order: (row label, record kind, keys, seed).
EVALS = (
    ("KV-substitution", "kv_subst", "heldout", 100),
    ("numeric arithmetic", "numeric", "train", 99),
    ("KV-arithmetic", "kv_arith", "heldout", 101),
    ("KV-arithmetic (training keys)", "kv_arith", "train", 102),
    ("key first: k + n, k - n", "kv_first", "heldout", 103),
    ("key second: n + k, n - k", "kv_second", "heldout", 104),
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
    handle = None
    if cfg.operand_mix or cfg.key_mix:
        p, w = cfg.operand_mix or (0.0, 0.0)
        kp, kw = cfg.key_mix or (0.0, 0.0)
        handle = task.mix_operands(c.model, p, w, key_p=kp, key_max_weight=kw)
    try:
        rows = task.records("numeric", 20_000, seed=1)
        if cfg.unknown_keys:
            rows += task.unknown_records(int(cfg.unknown_keys * len(rows)), seed=1)
            random.Random(cfg.seed).shuffle(rows)
        c.fit(
            rows,
            **_fit_options(cfg.anchor_steps, cfg.anchor_lr, cfg.batch_size, 7, cfg.seed, packing=False),
        )
    finally:
        if handle is not None:
            handle.remove()
    if cfg.unknown_keys:  # only key 0's row trained: every key reads it again
        task.blind_to_keys_(c.model)
    return c.model.requires_grad_(False)


def train_calm(cfg: KVConfig, task, anchor, aug, seed: int = 0, callbacks: list | None = None):
    """CALM on expressions over the training keys (20%), plus numeric ones to keep arithmetic.

    ``seed`` (a composition seed) fixes the connection's initialisation and the data order.
    """
    from .. import Composer

    train = []
    for data_seed, (kind, frac) in enumerate(cfg.calm_mix.items(), start=3):
        train += task.records(kind, int(frac * cfg.calm_rows), keys="train", seed=data_seed)
    torch.manual_seed(seed)
    calm = Composer(
        anchor, aug, strategy="calm", connections=cfg.connections, num_heads=cfg.calm_heads, **cfg.calm_options
    )
    options = _fit_options(cfg.calm_steps, cfg.calm_lr, cfg.calm_batch_size, 7, seed, packing=False)
    options.update(cfg.calm_fit)
    calm.fit(train, callbacks=list(callbacks or []), **options)
    return calm


def eval_sets(task, cfg: KVConfig) -> dict[str, list[dict]]:
    """The CALM table's evaluation sets (:data:`EVALS`), ``cfg.eval_n`` expressions each."""
    return {label: task.records(kind, cfg.eval_n, keys=keys, seed=s) for label, kind, keys, s in EVALS}


def train_bases(cfg: KVConfig, task) -> dict[str, Any]:
    """m_A and m_B from scratch, with what the demo logs about them (memory, probe, numeric accuracy)."""
    from ..tasks.kv_arithmetic import answer_accuracy

    t, c = time.perf_counter(), time.process_time()
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
    numeric = answer_accuracy(anchor, task.records("numeric", cfg.eval_n, seed=99))
    _log(
        f"[calm] m_B {cfg.anchor_layers}x{cfg.anchor_hidden} numeric arithmetic {numeric:.1%} "
        f"({time.perf_counter() - t:.0f}s)"
    )
    return {"aug": aug, "anchor": anchor, "memorised": mem_acc, "probe": probe, "cpu_seconds": time.process_time() - c}


def score(models: dict[str, Any], evals: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Exact match (%) of each model on each evaluation set: ``{task: {model: %}}``."""
    from ..tasks.kv_arithmetic import answer_accuracy

    return {
        name: {label: 100 * answer_accuracy(m, recs) for label, m in models.items()} for name, recs in evals.items()
    }


def run_kv_in_process(cfg: KVConfig, out: Path, threads: int) -> dict[str, Any]:
    """:func:`run_kv` with ``threads`` torch threads (the entry point of the demo's second process)."""
    torch.set_num_threads(threads)
    return run_kv(cfg, out)


def run_kv(cfg: KVConfig, out: Path) -> dict[str, Any]:
    """Train m_A (memory) and m_B (arithmetic) from scratch, compose them with CALM once per
    composition seed (``cfg.calm_seeds``), and score every model."""
    from ..tasks.kv_arithmetic import KVArithmetic

    t0, c0 = time.perf_counter(), time.process_time()
    task = KVArithmetic(num_keys=cfg.num_keys, num_values=cfg.num_values, seed=cfg.seed)
    bases = train_bases(cfg, task)
    aug, anchor = bases["aug"], bases["anchor"]
    evals = eval_sets(task, cfg)
    table = score({"m_A": aug, "m_B": anchor}, evals)
    compositions, examples = [], []
    for seed in cfg.calm_seeds:
        t = time.perf_counter()
        calm = train_calm(cfg, task, anchor, aug, seed=seed)
        n_calm = _n_trainable(calm)
        scores = score({"CALM": calm.model}, evals)
        for name in table:
            table[name][f"CALM seed {seed}"] = scores[name]["CALM"]
        held = scores["KV-arithmetic"]["CALM"]
        _log(
            f"[calm] composition seed {seed} ({n_calm:,} trainable parameters) trained in "
            f"{time.perf_counter() - t:.0f}s: held-out KV-arithmetic {held:.1f}%, "
            f"training keys {scores['KV-arithmetic (training keys)']['CALM']:.1f}%"
        )
        compositions.append(
            {"seed": seed, "history": calm.history, "scores": {k: v["CALM"] for k, v in scores.items()}}
        )
        if not examples:
            examples = _examples(task, calm, evals["KV-arithmetic"][:5])
    seeds = [f"CALM seed {s}" for s in cfg.calm_seeds]
    rows = []
    for name, by_model in table.items():
        values = [by_model[k] for k in seeds]
        rows.append({"task": name, **by_model, "CALM min": min(values), "CALM mean": sum(values) / len(values)})
    _plot_kv(rows, out / "kv_arithmetic.png", len(seeds))
    return {
        "config": asdict(cfg),
        "rows": rows,
        "m_A_memorised_%": 100 * bases["memorised"],
        "probe_heldout_%": {k: 100 * v for k, v in bases["probe"].items()},
        "calm_trainable": n_calm,
        "compositions": compositions,
        "examples": examples,
        "vocab": {
            "keys": cfg.num_keys,
            "values": cfg.num_values,
            "train_keys": len(task.train_keys),
            "heldout_keys": len(task.heldout_keys),
            "vocab_size": task.vocab_size,
        },
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
    }


def summary_line(rows: list[dict[str, Any]]) -> str:
    """The held-out KV-arithmetic result over this run's composition seeds, as the demo prints it."""
    row = next(r for r in rows if r["task"] == "KV-arithmetic")
    seeds = [k for k in row if k.startswith("CALM seed ")]
    each = ", ".join(f"{k[5:]}: {row[k]:.1f}%" for k in seeds)
    return (
        f"CALM on held-out-key KV-arithmetic, {len(seeds)} composition seed(s) ({each}): "
        f"min {row['CALM min']:.1f}%, mean {row['CALM mean']:.1f}%"
    )


def _examples(task, calm, records: list[dict]) -> list[dict[str, str]]:
    """Greedy generation through the composed model's own decoding loop, as a user would call it."""
    examples = []
    for rec in records:
        prompt = torch.tensor([rec["input_ids"][: rec["answer_pos"]]])
        gen = calm.generate(prompt, max_new_tokens=2, do_sample=False)[0].tolist()
        examples.append(
            {
                "prompt": task.decode(prompt[0]),
                "generated": task.decode(gen[prompt.shape[1] :]),
                "answer": task.decode([rec["input_ids"][rec["answer_pos"]]]),
            }
        )
    return examples


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


def _plot_kv(rows: list[dict[str, Any]], path: Path, n_seeds: int) -> None:
    """Bars: m_A, m_B and CALM's mean over the composition seeds, whiskers from CALM's min to max."""
    plt = _pyplot()
    labels = ["m_A", "m_B", "CALM mean"]
    colors = {"m_A": "tab:orange", "m_B": "tab:blue", "CALM mean": "tab:green"}
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.26
    for k, label in enumerate(labels):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        ys = [r[label] for r in rows]
        err = None
        if label == "CALM mean":
            highs = [max(v for key, v in r.items() if key.startswith("CALM seed ")) for r in rows]
            err = [[y - r["CALM min"] for y, r in zip(ys, rows)], [h - y for h, y in zip(highs, ys)]]
        name = f"CALM (mean of {n_seeds} seeds, min-max)" if label == "CALM mean" else label
        bars = ax.bar(xs, ys, width, label=name, color=colors[label], yerr=err, capsize=3 if err else 0)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(rows)), [r["task"] for r in rows], fontsize=8, rotation=15, ha="right")
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.set_title("CALM key-value arithmetic (keys held out from the composition's training)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
