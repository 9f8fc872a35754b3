"""Benchmark: training throughput and peak memory of block expansion.

Three ways to train the same expanded model on the same batches:

* ``compose``  - ``Composer(..., strategy="block_expand").fit``: frozen weights in the
  load dtype (bf16 on GPU), fp32 master copies of the new blocks only, autocast,
  fused AdamW over the trainable tensors only;
* ``naive``    - what a script does: the expanded model in fp32, ``requires_grad=False`` on
  the frozen tensors, ``AdamW(model.parameters())``, autocast, a plain PyTorch loop;
* ``full``     - full fine-tuning of the same expanded model with compose's loop.

Each variant runs in its own subprocess so that peak memory (CUDA max allocated, or the
process's max RSS on CPU) is its own. Usage::

    python bench/block_expand.py                 # CPU shape (~60M LLaMA-shaped)
    python bench/block_expand.py --gpu           # LLaMA-1.1B shape, 24 -> 30 blocks, bf16, 8 x 2048
    python bench/block_expand.py --out bench/results/block_expand_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

SHAPES = {
    # ~60M parameters, LLaMA-shaped; 8 -> 10 blocks
    "cpu": dict(
        hidden=512, ffn=1408, heads=8, kv_heads=4, layers=8, vocab=32000, new=2, batch=4, seq=256, warmup=2, steps=6
    ),
    # LLaMA 1.1B (TinyLlama) shape; 24 -> 30 blocks as in the issue
    "gpu": dict(
        hidden=2048,
        ffn=5632,
        heads=32,
        kv_heads=4,
        layers=24,
        vocab=32000,
        new=6,
        batch=8,
        seq=2048,
        warmup=3,
        steps=10,
    ),
}


def build_anchor(shape: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["ffn"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        num_hidden_layers=shape["layers"],
        vocab_size=shape["vocab"],
        max_position_embeddings=max(2048, shape["seq"]),
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def batches(shape: dict, n: int):
    import torch

    g = torch.Generator().manual_seed(1)
    return [
        {"input_ids": torch.randint(0, shape["vocab"], (shape["seq"],), generator=g).tolist()}
        for _ in range(n * shape["batch"])
    ]


def run_variant(variant: str, shape_name: str) -> dict:
    import torch

    from compose import Composer

    shape = SHAPES[shape_name]
    cuda = torch.cuda.is_available()
    total = shape["warmup"] + shape["steps"]
    data = batches(shape, total)
    anchor = build_anchor(shape)
    stamps: list[float] = []
    rss0: list[int] = []  # resident memory when training starts (model and data built)

    def stamp(step, metrics):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    def start() -> None:
        # Import and set up accelerate first in every variant, so that the memory measured from
        # here on is training's (activations, gradients, optimizer state), not module imports.
        from accelerate import Accelerator

        Accelerator(cpu=not cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rss0.append(_rss_bytes())

    fit = dict(
        max_steps=total,
        learning_rate=1e-4,
        batch_size=shape["batch"],
        seq_len=shape["seq"],
        warmup_ratio=0.0,
        progress=False,
        callbacks=[stamp],
        log_every=total,
    )
    if variant in ("compose", "compose_gc", "full"):
        dtype = "bfloat16" if cuda else None
        strategy = (
            dict(strategy="full") if variant == "full" else dict(strategy="block_expand", num_blocks=shape["new"])
        )
        if variant == "full":
            # full fine-tuning of the same expanded model: expand, then train everything
            expanded = Composer(anchor, strategy="block_expand", num_blocks=shape["new"], copy_model=False).model
            c = Composer(expanded, copy_model=False, dtype="float32", **strategy)
        else:
            c = Composer(anchor, copy_model=False, dtype=dtype, **strategy)
        trainable = sum(p.numel() for p in c.trainable_parameters().values())
        start()
        c.fit(data, gradient_checkpointing=variant == "compose_gc", **fit)
    elif variant == "naive":
        model = Composer(anchor, strategy="block_expand", num_blocks=shape["new"], copy_model=False).model
        device = "cuda" if cuda else "cpu"
        model.to(device).train()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        ids = torch.tensor([d["input_ids"] for d in data])
        start()
        for step in range(total):
            x = ids[step * shape["batch"] : (step + 1) * shape["batch"]].to(device)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            stamp(step, None)
    else:
        raise ValueError(variant)
    measured = stamps[shape["warmup"] :]
    seconds = stamps[-1] - stamps[shape["warmup"] - 1]
    tokens = len(measured) * shape["batch"] * shape["seq"]
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated(), "CUDA max allocated"
    else:
        # the process's high-water mark minus what it held when training started: the memory
        # that training itself needs (activations, gradients, optimizer state), not imports
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0[0], "max RSS - RSS at start"
    return {
        "variant": variant,
        "tokens_per_s": tokens / seconds,
        "peak_gib": peak / 2**30,
        "trainable_params": trainable,
        "peak_kind": kind,
    }


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (
        f"{os.cpu_count()}-core {platform.machine()} CPU, {platform.processor() or 'cpu'} (torch {torch.__version__})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the LLaMA-1.1B shape (needs a CUDA GPU)")
    parser.add_argument("--variants", default="naive,compose,compose_gc,full")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant (median reported)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape_name = "gpu" if args.gpu else "cpu"
    if args._child:
        print(json.dumps(run_variant(args._child, shape_name)))
        return
    variants = args.variants.split(",")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    # Variants alternate round by round, and the median is reported, so that a change in the
    # machine's load hits every variant alike.
    for round_ in range(args.rounds):
        for variant in variants:
            cmd = [sys.executable, __file__, "--_child", variant] + (["--gpu"] if args.gpu else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"variant {variant} failed")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[variant].append(r)
            print(f"  round {round_ + 1} {variant}: {r['tokens_per_s']:.0f} tok/s, {r['peak_gib']:.2f} GiB", flush=True)
    results = []
    for variant in variants:
        rs = runs[variant]
        results.append(
            {
                **rs[0],
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                "peak_gib": statistics.median(r["peak_gib"] for r in rs),
                "rounds": [{"tokens_per_s": r["tokens_per_s"], "peak_gib": r["peak_gib"]} for r in rs],
            }
        )
    base = next(r for r in results if r["variant"] == "naive")
    shape = SHAPES[shape_name]
    print(
        f"\nblock_expand fit, {machine()}; LLaMA shape hidden {shape['hidden']}, {shape['layers']} -> "
        f"{shape['layers'] + shape['new']} blocks, batch {shape['batch']} x {shape['seq']}\n"
    )
    print(f"peak memory: {results[0]['peak_kind']}; median of {args.rounds} rounds\n")
    print("| variant | tokens/s | vs naive | peak memory (GiB) | vs naive | trainable params |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
            f"{r['peak_gib']:.2f} | {r['peak_gib'] / base['peak_gib']:.2f}x | {r['trainable_params']:,} |"
        )
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"machine": machine(), "shape": shape, "results": results}, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
