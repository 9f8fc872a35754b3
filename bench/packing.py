"""Cost of exact document boundaries: a training step with ``packing_attention="document"`` vs ``"block"``.

    python bench/packing.py                       # CPU, SDPA and eager, results as JSON + markdown
    python bench/packing.py --seq-len 2048 --rounds 5

Same model, same packed blocks (documents of log-normally distributed lengths, mean about
``--mean-doc`` tokens, joined with EOS), one forward + backward + AdamW step per call:

* ``block``: ``input_ids`` + an all-ones ``attention_mask`` (SDPA takes its causal fast path);
* ``document``: ``input_ids`` + per-document ``position_ids``, no mask, no cache
  (transformers builds the block-diagonal causal mask from the positions).

Both run through :func:`compose.packing.model_inputs`, exactly as ``fit`` calls the model.
The variants alternate step by step after a warm-up, so load changes on a shared machine hit
both alike; the median step time of each is reported, with the ratio document / block.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from compose import packing
from compose.data import build_blocks
from compose.testing import tiny_model

RESULTS = Path(__file__).parent / "results"


def _documents(n_tokens: int, mean: int, vocab: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < n_tokens:
        length = max(2, int(rng.lognormal(np.log(mean) - 0.5, 1.0)))
        docs.append({"input_ids": rng.integers(4, vocab, length).tolist() + [2]})
        total += length + 1
    return docs


def _batches(args, vocab: int) -> dict[str, dict[str, torch.Tensor]]:
    docs = _documents(args.batch_size * args.seq_len, args.mean_doc, vocab, args.seed)
    out = {}
    for mode in ("block", "document"):
        blocks = build_blocks(docs, None, args.seq_len, reset_position_ids=mode == "document")
        out[mode] = blocks.batch(range(args.batch_size))
    return out


def _step(model, optimizer, batch) -> tuple[float, float]:
    """Wall and CPU (all threads of this process) seconds of one training step."""
    wall, cpu = time.perf_counter(), time.process_time()
    loss = model(**packing.model_inputs(batch, model), labels=batch["labels"]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def run(args, impl: str) -> dict:
    model = tiny_model(
        "llama", hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.heads,
        vocab=args.vocab, positions=args.seq_len,
    ).train()  # fmt: skip
    model.set_attn_implementation(impl)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batches = _batches(args, args.vocab)
    docs = packing.document_ids(batches["document"]["position_ids"])
    times: dict[str, list[tuple[float, float]]] = {"block": [], "document": []}
    for _ in range(args.warmup):
        for mode in times:
            _step(model, optimizer, batches[mode])
    for r in range(args.rounds):
        for mode in times if r % 2 == 0 else reversed(times):
            times[mode].append(_step(model, optimizer, batches[mode]))
    wall = {m: statistics.median(w for w, _ in t) for m, t in times.items()}
    cpu = {m: statistics.median(c for _, c in t) for m, t in times.items()}
    return {
        "attention": impl,
        "documents_per_block": float((docs[:, -1] + 1).float().mean()),
        "block_s": wall["block"],
        "document_s": wall["document"],
        "ratio": wall["document"] / wall["block"],
        "block_cpu_s": cpu["block"],
        "document_cpu_s": cpu["document"],
        "cpu_ratio": cpu["document"] / cpu["block"],
        "rounds": args.rounds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--mean-doc", type=int, default=300, help="mean document length in tokens")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", nargs="+", default=["sdpa", "eager"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (1: steadiest on a shared machine)")
    p.add_argument("--out", default=str(RESULTS / "packing_cpu.json"))
    args = p.parse_args()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [run(args, impl) for impl in args.attention]
    shape = f"llama hidden {args.hidden}, {args.layers} layers, batch {args.batch_size} x {args.seq_len}"
    threads = torch.get_num_threads()
    print(f"\n{shape}, documents of ~{args.mean_doc} tokens; torch {torch.__version__}, {threads} thread(s)\n")
    print("| attention | documents / block | block (s/step) | document (s/step) | wall ratio | CPU-time ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['attention']} | {r['documents_per_block']:.1f} | {r['block_s']:.3f} | {r['document_s']:.3f} "
            f"| {r['ratio']:.2f}x | {r['cpu_ratio']:.2f}x |"
        )
    meta = {"args": vars(args), "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "threads": threads}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
