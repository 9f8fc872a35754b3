"""Seed x thread grid of the demo's CALM key-value arithmetic experiment.

    python bench/kv_grid.py                                   # 3 base seeds x 2 composition seeds x {1, 2} threads
    python bench/kv_grid.py --seeds 0 --threads 1             # a part of it; results merge into the JSON
    python bench/kv_grid.py --variant paper --seeds 0 1 2     # the paper's connection on the same models
    python bench/kv_grid.py --table-only                      # rewrite the table in docs/results.md from the JSON

For every base seed (the key table, m_A and m_B) and every thread count, one fresh process
trains m_A and m_B with ``torch.set_num_threads(threads)`` exactly as ``python -m compose.demo``
does, then composes them once per composition seed and scores every model on the demo's
evaluation sets (:data:`compose.demo.kv.EVALS`). Thread count changes floating-point
summation order and so the trajectory: a result that holds on one machine only shows up
here.

Each run is one row of ``--out`` (JSON, keyed by variant, base seed, threads and
composition seed, so that partial grids accumulate across invocations) and of the
markdown table written between ``<!-- kv-grid:VARIANT -->`` markers in ``--markdown``.
Times are CPU seconds of the worker process (``time.process_time``), which a loaded
machine inflates less than wall time.

``--cache DIR`` keeps the trained m_A and m_B per (base seed, threads) and reuses them:
they depend on nothing else, so a second variant on the same models costs only the
compositions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Overrides of :class:`compose.demo.kv.KVConfig` per variant.
VARIANTS: dict[str, dict] = {
    # What `python -m compose.demo` runs.
    "demo": {},
    # The paper's connection: cross-attention from every m_A layer into interior m_B layers
    # (the `every` plan), with the paper's options (no window, no null slot, no norm).
    "paper": {"connections": None, "calm_options": {"every": 1, "norm": False}},
}


#: KVConfig fields that m_A and m_B depend on (the cache key of ``--cache``).
BASE_FIELDS = (
    "num_keys", "num_values", "aug_hidden", "aug_layers", "aug_family", "anchor_hidden", "anchor_layers",
    "heads", "aug_steps", "aug_lr", "anchor_steps", "anchor_lr", "operand_mix", "key_mix", "unknown_keys", "batch_size",
    "seed",
)  # fmt: skip


def _bases(cfg, task, args: argparse.Namespace) -> dict:
    """m_A and m_B for ``cfg``: trained, or their weights loaded from ``--cache`` when trained before."""
    import hashlib

    import torch

    from compose.demo.common import _scratch_model
    from compose.demo.kv import train_bases

    if not args.cache:
        return train_bases(cfg, task)
    spec = json.dumps([getattr(cfg, f) for f in BASE_FIELDS] + [args.threads], default=list)
    path = Path(args.cache) / f"bases_{hashlib.sha256(spec.encode()).hexdigest()[:16]}.pt"
    if path.exists():
        saved = torch.load(path)
        aug = _scratch_model(cfg.aug_family, task.vocab_size, cfg.aug_hidden, cfg.aug_layers, cfg.heads, 64, 0)
        anchor = _scratch_model("llama", task.vocab_size, cfg.anchor_hidden, cfg.anchor_layers, cfg.heads, 64, 0)
        aug.load_state_dict(saved["aug"])
        anchor.load_state_dict(saved["anchor"])
        return {"aug": aug.requires_grad_(False), "anchor": anchor.requires_grad_(False), **saved["info"]}
    bases = train_bases(cfg, task)
    info = {k: v for k, v in bases.items() if k not in ("aug", "anchor")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"aug": bases["aug"].state_dict(), "anchor": bases["anchor"].state_dict(), "info": info}, tmp)
    tmp.replace(path)
    return bases


def _worker(args: argparse.Namespace) -> None:
    import torch

    from compose.demo.kv import KVConfig, eval_sets, score, train_calm
    from compose.tasks.kv_arithmetic import KVArithmetic

    torch.set_num_threads(args.threads)
    overrides = {**VARIANTS[args.variant], **json.loads(args.override or "{}")}
    cfg = replace(KVConfig(), seed=args.seed, calm_seeds=tuple(args.calm_seeds), **overrides)
    task = KVArithmetic(num_keys=cfg.num_keys, num_values=cfg.num_values, seed=cfg.seed)
    bases = _bases(cfg, task, args)
    evals = eval_sets(task, cfg)
    alone = score({"m_A": bases["aug"], "m_B": bases["anchor"]}, evals)
    held_tr = task.records("kv_arith", 500, keys="train", seed=202)
    held_ho = task.records("kv_arith", 500, keys="heldout", seed=201)
    for seed in cfg.calm_seeds:
        curve: list[dict] = []
        model_ref: list = []

        def track(step: int, metrics: dict, curve=curve, model_ref=model_ref) -> None:
            if args.curve_every and model_ref and (step % args.curve_every == 0 or step == cfg.calm_steps):
                from compose.tasks.kv_arithmetic import answer_accuracy

                m = model_ref[0]
                curve.append(
                    {
                        "step": step,
                        "loss": metrics.get("loss"),
                        "training keys": 100 * answer_accuracy(m, held_tr),
                        "held-out": 100 * answer_accuracy(m, held_ho),
                    }
                )

        c0 = time.process_time()
        calm = _train_with_ref(cfg, task, bases, seed, track, model_ref, train_calm)
        cpu = time.process_time() - c0
        scores = score({"CALM": calm.model}, evals)
        row = {
            "variant": args.variant,
            "override": overrides,
            "seed": args.seed,
            "threads": args.threads,
            "calm_seed": seed,
            "m_A": alone["KV-arithmetic"]["m_A"],
            "m_B": alone["KV-arithmetic"]["m_B"],
            "m_B numeric": alone["numeric arithmetic"]["m_B"],
            "numeric": scores["numeric arithmetic"]["CALM"],
            "training keys": scores["KV-arithmetic (training keys)"]["CALM"],
            "held-out": scores["KV-arithmetic"]["CALM"],
            "scores": {k: v["CALM"] for k, v in scores.items()},
            "calm_cpu_seconds": cpu,
            "bases_cpu_seconds": bases["cpu_seconds"],
            "curve": curve,
            "config": asdict(cfg),
        }
        print("ROW " + json.dumps(row), flush=True)


def _train_with_ref(cfg, task, bases, seed, track, model_ref, train_calm):
    """``train_calm`` with a callback that can see the model being trained."""
    from compose import Composer

    original = Composer.fit

    def fit(self, *a, **kw):
        model_ref.append(self.model)
        return original(self, *a, **kw)

    Composer.fit = fit
    try:
        return train_calm(cfg, task, bases["anchor"], bases["aug"], seed=seed, callbacks=[track])
    finally:
        Composer.fit = original


def _key(row: dict) -> str:
    return f"{row['variant']}/{json.dumps(row['override'], sort_keys=True)}/{row['seed']}/{row['threads']}/{row['calm_seed']}"


def _changes(row: dict) -> str:
    """What a run changed over its variant's settings (``-`` for none)."""
    base = VARIANTS.get(row.get("variant"), {})
    diff = {k: v for k, v in row.get("override", {}).items() if base.get(k, object()) != v}
    return "`" + json.dumps(diff, sort_keys=True) + "`" if diff else "-"


def _table(rows: list[dict]) -> str:
    changes = len({_changes(r) for r in rows}) > 1
    head = (
        ("| changes " if changes else "")
        + "| base seed | threads | composition seed | m_A | m_B | m_B numeric | CALM numeric "
        "| CALM training keys | **CALM held-out** | CPU s (composition) |\n"
        + ("|---" if changes else "")
        + "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        (f"| {_changes(r)} " if changes else "")
        + f"| {r['seed']} | {r['threads']} | {r['calm_seed']} | {r['m_A']:.1f} | {r['m_B']:.1f} | {r['m_B numeric']:.1f} "
        f"| {r['numeric']:.1f} | {r['training keys']:.1f} | **{r['held-out']:.1f}** | {r['calm_cpu_seconds']:.0f} |"
        for r in sorted(rows, key=lambda r: (_changes(r), r["seed"], r["threads"], r["calm_seed"]))
    ]
    held = [r["held-out"] for r in rows]
    ok = [
        r["held-out"] >= 80
        and r["training keys"] >= 95
        and max(r["m_A"], r["m_B"]) <= 5
        and r["numeric"] >= r["m_B numeric"] - 5
        for r in rows
    ]
    summary = (
        f"\n{len(rows)} runs: held-out min {min(held):.1f}%, mean {sum(held) / len(held):.1f}%, "
        f"max {max(held):.1f}%; training keys min {min(r['training keys'] for r in rows):.1f}%; "
        f"{sum(ok)} of {len(rows)} meet all of: held-out >= 80%, training keys >= 95%, m_A and m_B <= 5%, "
        "numeric within 5 points of m_B.\n"
    )
    return head + "\n".join(lines) + "\n" + summary


def write_markdown(path: Path, variant: str, rows: list[dict]) -> None:
    """Replace the text between ``<!-- kv-grid:VARIANT -->`` and ``<!-- /kv-grid:VARIANT -->`` in ``path``."""
    begin, end = f"<!-- kv-grid:{variant} -->", f"<!-- /kv-grid:{variant} -->"
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} ... {end} markers; add them where the {variant!r} table should go")
    before, rest = text.split(begin, 1)
    after = rest.split(end, 1)[1]
    path.write_text(before + begin + "\n" + _table(rows) + end + after)


def plot(rows: list[dict], path: Path) -> None:
    """Held-out and training-key KV-arithmetic of every run, one column per (base seed, threads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["seed"], r["threads"]) for r in rows})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for metric, marker, color in (("held-out", "o", "tab:green"), ("training keys", "x", "tab:gray")):
        xs = [groups.index((r["seed"], r["threads"])) + (0.08 if metric == "held-out" else -0.08) for r in rows]
        ax.scatter(xs, [r[metric] for r in rows], marker=marker, color=color, label=f"CALM, {metric} keys")
    ax.axhline(80, color="tab:red", lw=0.8, ls="--", label="80%")
    ax.set_xticks(range(len(groups)), [f"seed {s}\n{t} thread{'s' * (t > 1)}" for s, t in groups], fontsize=8)
    ax.set_ylabel("KV-arithmetic exact match (%)")
    ax.set_ylim(0, 102)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("CALM over base seeds, composition seeds and thread counts", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _worker_cmd(args: argparse.Namespace, seed: int, threads: int) -> list[str]:
    cmd = [sys.executable, __file__, "--worker", "--seed", str(seed), "--threads", str(threads)]
    cmd += ["--variant", args.variant, "--calm-seeds", *map(str, args.calm_seeds)]
    cmd += ["--curve-every", str(args.curve_every)]
    if args.override:
        cmd += ["--override", args.override]
    if args.cache:
        cmd += ["--cache", args.cache]
    return cmd


def _run_workers(args: argparse.Namespace, jobs: list[tuple[int, int]], results: dict, out: Path) -> None:
    """Run one worker process per (base seed, threads), ``args.jobs`` at a time; collect their rows.

    Workers running side by side change only how fast each runs, not what it computes (the
    thread count of each, which fixes its summation order, is its own).
    """
    import selectors

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pending, running = list(jobs), {}
    sel = selectors.DefaultSelector()
    while pending or running:
        while pending and len(running) < args.jobs:
            seed, threads = pending.pop(0)
            proc = subprocess.Popen(
                _worker_cmd(args, seed, threads), stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
            )
            running[proc.stdout] = (proc, seed, threads)
            sel.register(proc.stdout, selectors.EVENT_READ)
        for key, _ in sel.select():
            proc, seed, threads = running[key.fileobj]
            line = key.fileobj.readline()
            if line:
                _handle_line(args, line, seed, threads, results, out)
                continue
            sel.unregister(key.fileobj)
            del running[key.fileobj]
            if proc.wait():
                raise SystemExit(f"worker for seed {seed}, threads {threads} failed (exit {proc.returncode})")


def _handle_line(args: argparse.Namespace, line: str, seed: int, threads: int, results: dict, out: Path) -> None:
    if not line.startswith("ROW "):
        print(f"[seed {seed}, {threads} thread(s)] {line}", end="", flush=True)
        return
    row = json.loads(line[4:])
    results[_key(row)] = row
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    tmp.replace(out)
    print(
        f"{args.variant} seed {seed} threads {threads} composition seed {row['calm_seed']}: "
        f"held-out {row['held-out']:.1f}%, training keys {row['training keys']:.1f}%, "
        f"numeric {row['numeric']:.1f}% (m_B {row['m_B numeric']:.1f}%), "
        f"{row['calm_cpu_seconds']:.0f} CPU s",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="base seeds (m_A, m_B, key table)")
    p.add_argument("--calm-seeds", type=int, nargs="+", default=[0, 1], help="composition seeds")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="demo")
    p.add_argument(
        "--override", default=None, help="JSON object of more KVConfig overrides, e.g. '{\"calm_steps\": 3000}'"
    )
    p.add_argument("--out", default=str(ROOT / "docs/results/kv_grid.json"))
    p.add_argument("--markdown", default=str(ROOT / "docs/results.md"))
    p.add_argument("--cache", default=None, help="directory that keeps trained m_A / m_B per (base seed, threads)")
    p.add_argument("--curve-every", type=int, default=0, help="record training/held-out accuracy every N steps")
    p.add_argument("--plot", default=None, help="also write a PNG of the variant's runs here")
    p.add_argument("--jobs", type=int, default=2, help="worker processes run side by side (default 2)")
    p.add_argument("--table-only", action="store_true", help="only rewrite the markdown table from --out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.threads = args.threads[0]
        return _worker(args)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    if not args.table_only:
        jobs = [(seed, threads) for seed in args.seeds for threads in args.threads]
        _run_workers(args, jobs, results, out)
    # The demo's table holds the demo's own configuration only; another variant's holds every
    # attempt made with it, each marked with what it changed.
    rows = [
        r
        for r in results.values()
        if r["variant"] == args.variant and (args.variant != "demo" or r["override"] == VARIANTS["demo"])
    ]
    if rows and args.markdown:
        write_markdown(Path(args.markdown), args.variant, rows)
    if rows and args.plot:
        plot(rows, Path(args.plot))
    if rows:
        print(_table(rows))


if __name__ == "__main__":
    main()
