"""CALM overheads: forward time, per-token decode time, training memory.

    python bench/calm.py --out bench/calm_cpu.json          # CPU shape, ~2-3 minutes on 2 cores
    python bench/calm.py --gpu --out bench/calm_gpu.json    # LLaMA-1.1B-shape anchor + 150M augment, bf16

Measures, on random-weight models of the given shapes (speed and memory do not depend on
the weights):

(a) composed forward time / (anchor forward + augmenting forward), batch x seq tokens, no grad;
(b) per-token decode time at two prefix lengths, batch 1, greedy: transformers' ``generate`` on
    the composition (over its composite cache: each model's KV cache plus the projected
    keys/values per connection), against the floor (one cached step of the anchor plus one of
    the augmenting model's decoder stack, measured in the same run) and against ``generate``
    with ``use_cache=False`` (the full composed forward every step);
(c) peak memory of one training step (forward, backward, AdamW step over the connections)
    against anchor-only inference of the same batch. GPU: ``torch.cuda.max_memory_allocated``.
    CPU: peak resident set size sampled every millisecond in a fresh subprocess per
    measurement, with glibc's mmap threshold lowered so that freed tensors leave the RSS.

Prints a markdown table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compose import Composer  # noqa: E402

SHAPES = {
    "cpu": dict(
        anchor=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=8, vocab_size=32000),
        augment=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=32000),
        every=2, batch=4, seq=256, prefixes=(128, 1024), dtype="float32",
    ),
    "gpu": dict(
        anchor=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, vocab_size=32000),
        augment=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                     num_key_value_heads=12, vocab_size=32000),
        every=4, batch=8, seq=2048, prefixes=(128, 2048), dtype="bfloat16",
    ),
}  # fmt: skip


def build(shape: dict, device: str) -> Composer:
    dtype = getattr(torch, shape["dtype"])

    def model(kw, seed):
        torch.manual_seed(seed)
        cfg = LlamaConfig(**kw, max_position_embeddings=4096, tie_word_embeddings=False)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(device).eval()

    c = Composer(model(shape["anchor"], 0), model(shape["augment"], 1), strategy="calm", every=shape["every"],
                 copy_model=False)  # fmt: skip
    with torch.no_grad():  # non-zero output projections: the composed path really computes
        for conn in c.model.connections:
            torch.nn.init.normal_(conn.o.weight, std=0.02)
    return c


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def bench_forward(c: Composer, shape: dict, device: str, repeat: int) -> dict:
    ids = torch.randint(3, 32000, (shape["batch"], shape["seq"]), device=device)
    m = c.model
    composed = timed(lambda: m(ids), device, repeat)
    anchor = timed(lambda: m.anchor(ids, use_cache=False), device, repeat)
    augment = timed(lambda: m.augments[0](ids, use_cache=False), device, repeat)
    return dict(composed_s=composed, anchor_s=anchor, augment_s=augment, ratio=composed / (anchor + augment))


def _cached_step_time(model, ids: torch.Tensor, device: str, steps: int, **kwargs) -> float:
    """Per-token time of ``model`` (a transformers model) fed one token at a time over its own cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    mask = torch.ones_like(ids)
    model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, **kwargs)
    token = ids[:, -1:]
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True, **kwargs)
    sync(device)
    return (time.perf_counter() - t) / steps


@torch.no_grad()
def bench_decode(c: Composer, prefix: int, device: str, steps: int, naive_steps: int, repeat: int) -> dict:
    """Per-token decode time through transformers' ``generate`` against the floor (anchor step + augment step).

    ``generate`` time per token is ``(t(steps + 1 new tokens) - t(1 new token)) / steps``, so the
    prompt's prefill cancels. Medians over ``repeat`` interleaved runs; ``floor_ratio`` is the
    median of the per-run ratios. The floor runs the anchor (with its LM head) and the augmenting
    model's decoder stack (no LM head, as the composition uses it) one cached token at a time.
    """
    m = c.model
    ids = torch.randint(3, 32000, (1, prefix), device=device)

    def generate(n: int, **kw) -> float:
        sync(device)
        t = time.perf_counter()
        m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
        sync(device)
        return time.perf_counter() - t

    generate(2)  # warm-up
    runs = []
    for _ in range(repeat):  # interleaved, so that a change in machine load hits all three alike
        ours = (generate(steps + 1) - generate(1)) / steps
        anchor = _cached_step_time(m.anchor, ids, device, steps, logits_to_keep=1)
        augment = _cached_step_time(m.augments[0].base_model, ids, device, steps)
        runs.append((ours, anchor, augment, (anchor + augment) / ours))
    ours, anchor, augment, ratio = (statistics.median(r[i] for r in runs) for i in range(4))
    naive = (generate(naive_steps + 1, use_cache=False) - generate(1, use_cache=False)) / naive_steps
    return dict(
        prefix=prefix, generate_s=ours, anchor_cached_s=anchor, augment_cached_s=augment, floor_s=anchor + augment,
        naive_s=naive, floor_ratio=ratio,
    )  # fmt: skip


def _step(c: Composer, shape: dict, device: str, what: str) -> None:
    ids = torch.randint(3, 32000, (shape["batch"], shape["seq"]), device=device)
    m = c.model
    if what == "anchor_inference":
        with torch.no_grad():
            m.anchor(ids, use_cache=False)
        return
    params = [p for p in m.parameters() if p.requires_grad]
    for p in params:  # fp32 master weights, as compose.train does
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    m.train()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=shape["dtype"] == "bfloat16"):
        loss = m(ids, labels=ids).loss
    loss.backward()
    opt.step()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(shape_name: str, what: str) -> None:
    """Run one measurement in this (fresh) process and print its JSON."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    shape = SHAPES[shape_name]
    c = build(shape, "cpu")
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _step(c, shape, "cpu", what)
    peak[0] = max(peak[0], _rss())
    done.set()
    thread.join()
    print(json.dumps({"peak_delta_bytes": peak[0] - base, "base_bytes": base}))


def bench_memory(c: Composer | None, shape_name: str, device: str) -> dict:
    shape = SHAPES[shape_name]
    out = {}
    for what in ("anchor_inference", "train_step"):
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _step(c, shape, device, what)
            torch.cuda.synchronize()
            out[what] = torch.cuda.max_memory_allocated() - base
            c.model.zero_grad(set_to_none=True)
            c.model.eval()
        else:
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            res = subprocess.run(
                [sys.executable, __file__, "--memory-child", what, "--shape", shape_name],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            out[what] = json.loads(res.stdout.strip().splitlines()[-1])["peak_delta_bytes"]
    out["ratio"] = out["train_step"] / out["anchor_inference"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="LLaMA-1.1B-shape anchor + 150M augment, bf16, on CUDA")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--repeat", type=int, default=None, help="timed repetitions of each forward (median)")
    ap.add_argument("--only", choices=["forward", "decode", "memory"], default=None, help="run one measurement only")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="cpu", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.shape, args.memory_child)
        return

    shape_name = "gpu" if args.gpu else "cpu"
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device")
    if not args.gpu:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    shape = SHAPES[shape_name]
    repeat = args.repeat or (5 if args.gpu else 2)
    torch.manual_seed(0)
    c = build(shape, device)
    n_train = sum(p.numel() for p in c.trainable_parameters().values())
    n_anchor = sum(p.numel() for p in c.model.anchor.parameters())

    t0 = time.perf_counter()
    run = {args.only} if args.only else {"forward", "decode", "memory"}
    nan = float("nan")
    fwd = (
        bench_forward(c, shape, device, repeat)
        if "forward" in run
        else dict(composed_s=nan, anchor_s=nan, augment_s=nan, ratio=nan)
    )
    decode = [bench_decode(c, p, device, steps=32 if args.gpu else 16, naive_steps=4 if args.gpu else 2, repeat=repeat)
              for p in shape["prefixes"]] if "decode" in run else []  # fmt: skip
    mem = (
        bench_memory(c, shape_name, device)
        if "memory" in run
        else dict(train_step=nan, anchor_inference=nan, ratio=nan)
    )
    elapsed = time.perf_counter() - t0

    machine = torch.cuda.get_device_name() if args.gpu else f"{platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads"  # fmt: skip
    result = dict(
        shape=shape_name, machine=machine, torch=torch.__version__, plan=c.strategy.plan,
        trainable_params=n_train, anchor_params=n_anchor, forward=fwd, decode=decode, memory=mem,
        elapsed_s=elapsed, config={k: v for k, v in shape.items()},
    )  # fmt: skip
    mib = 2**20
    ms = 1e3
    rows = [
        "| measure | value |",
        "|---|---|",
        f"| shape | anchor {shape['anchor']['hidden_size']}x{shape['anchor']['num_hidden_layers']}, augment "
        f"{shape['augment']['hidden_size']}x{shape['augment']['num_hidden_layers']}, {shape['dtype']}, "
        f"{len(c.strategy.plan)} connections, trainable {n_train / 1e6:.2f}M = {100 * n_train / n_anchor:.1f}% of the anchor |",
        f"| forward, batch {shape['batch']} x {shape['seq']}: composed / (anchor + augment) | "
        f"{fwd['composed_s'] * ms:.0f} ms / ({fwd['anchor_s'] * ms:.0f} + {fwd['augment_s'] * ms:.0f} ms) = "
        f"**{fwd['ratio']:.2f}** |",
    ]
    for d in decode:
        rows.append(
            f"| decode per token, prefix {d['prefix']}: generate / floor (anchor + augment cached step) / "
            f"naive full forward | {d['generate_s'] * ms:.1f} / {d['floor_s'] * ms:.1f} "
            f"({d['anchor_cached_s'] * ms:.1f} + {d['augment_cached_s'] * ms:.1f}) / {d['naive_s'] * ms:.1f} ms; "
            f"floor / generate = **{d['floor_ratio']:.2f}** |"
        )
    rows.append(
        f"| peak memory, batch {shape['batch']} x {shape['seq']}: training step / anchor-only inference | "
        f"{mem['train_step'] / mib:.0f} / {mem['anchor_inference'] / mib:.0f} MiB = **{mem['ratio']:.2f}x** |"
    )
    print(f"CALM bench ({shape_name}, {machine}, torch {torch.__version__}, {elapsed:.0f} s)\n")
    print("\n".join(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")


if __name__ == "__main__":
    main()
