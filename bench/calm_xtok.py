"""Cross-tokenizer CALM: CPU cost of the character alignment against a training step.

    python bench/calm_xtok.py --out bench/results/calm_xtok_cpu.json   # a few minutes on 2 cores

The anchor reads a byte-level BPE (trained here on English prose from the standard library's
docstrings, ``compose.tasks.corpora``); the augmenting model reads single bytes (a byte-level
tokenizer without merges), so it sees about four times as many tokens. Models have
``bench/calm.py``'s CPU shapes (anchor hidden 512 x 8 layers, augmenting model 256 x 6) with
random weights; the batch is ``--batch`` rows of ``--seq`` anchor tokens.

Measured per batch, median of ``--repeats``:

* ``align``: what the composition adds in Python for cross-tokenizer mode: decode the anchor
  ids to text, the prefix ends of every anchor token, the augmenting tokenization with offsets,
  the visibility counts (``CrossTokenizer.align`` on every row);
* ``step``: one training step of the cross-tokenizer composition (forward with labels, backward,
  AdamW over the connections), which includes ``align``;
* ``step_same``: the same step for a same-vocabulary composition whose augmenting model reads the
  anchor's tokens (the augmenting model then sees 4x fewer tokens, so this is not the same work).

Prints a markdown table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compose import Composer  # noqa: E402
from compose.tasks.corpora import english_corpus  # noqa: E402

ANCHOR = dict(
    hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8
)
AUGMENT = dict(
    hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4
)


def byte_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE; ``vocab_size=257`` leaves the bytes alone (no merges)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos)


def model(shape: dict, vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, max_position_embeddings=8192, **shape)).eval()


def batch_of(tok, texts: list[str], batch: int, seq: int) -> torch.Tensor:
    ids = tok("\n\n".join(texts))["input_ids"]
    rows = [ids[i * seq : (i + 1) * seq] for i in range(batch)]
    assert all(len(r) == seq for r in rows), "corpus too short for this batch"
    return torch.tensor(rows)


def step_time(c: Composer, ids: torch.Tensor, repeats: int) -> float:
    params = [p for p in c.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    c.model.train()
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        loss = c.model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    texts = english_corpus(max_chars=400_000)
    anchor_tok = byte_bpe(texts, 4000)
    byte_tok = byte_bpe(texts[:10], 257)
    ids = batch_of(anchor_tok, texts[len(texts) // 2 :], args.batch, args.seq)

    anchor = model(ANCHOR, len(anchor_tok), 0)
    cross = Composer(
        anchor,
        model(AUGMENT, len(byte_tok), 1),
        strategy="calm",
        every=2,
        tokenizer=anchor_tok,
        augment_tokenizer=byte_tok,
        copy_model=False,
    )
    xt = cross.model.cross[0]
    rows = [r.tolist() for r in ids]
    aug_lens = [len(xt.align(r)[0]) for r in rows]
    align_times = []
    for _ in range(args.repeats + 1):
        t = time.perf_counter()
        for r in rows:
            xt.align(r)
        align_times.append(time.perf_counter() - t)
    align = statistics.median(align_times[1:])
    step = step_time(cross, ids, args.repeats)
    same = Composer(anchor, model(AUGMENT, len(anchor_tok), 1), strategy="calm", every=2, copy_model=False)
    step_same = step_time(same, ids, args.repeats)

    result = {
        "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "batch": args.batch,
        "anchor_tokens": args.seq,
        "augment_tokens_mean": statistics.mean(aug_lens),
        "align_s": align,
        "step_s": step,
        "step_same_vocab_s": step_same,
        "align_share_of_step": align / step,
    }
    print(json.dumps(result, indent=2))
    print()
    print(
        "| batch x anchor tokens | augmenting tokens per row | alignment | training step | share | same-vocabulary step |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.batch} x {args.seq} | {result['augment_tokens_mean']:.0f} | {align * 1e3:.1f} ms | "
        f"{step * 1e3:.0f} ms | {align / step:.1%} | {step_same * 1e3:.0f} ms |"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
