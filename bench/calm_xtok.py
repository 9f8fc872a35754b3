"""Cross-tokenizer CALM: CPU cost of the character alignment, and a small task it must learn.

    python bench/calm_xtok.py --out bench/results/calm_xtok_cpu.json          # cost, a few minutes
    python bench/calm_xtok.py learn --seed 0 --out bench/results/calm_xtok_learn_seed0.json  # the task, ~2 minutes

**learn**: key-value lookup. m_A memorises ``key:value`` for 128 three-letter keys (value one
digit; AdamW with weight decay ``--aug-weight-decay``, 0.1 by default); the anchor has learned
the ``key:digit`` format on random digits only (it guesses at chance). The composition
(connections into the anchor, trained on the lines of half the keys, loss on the value digit
only) is scored on the other half: it must read the value out of m_A for keys it never saw in
composition training. Twice, with the same steps, options, data and base-model seeds: m_A
reading the anchor's byte-level BPE (same tokenizer, position-aligned), and m_A reading
characters (cross-tokenizer, aligned by characters). The ratio of held-out accuracies is what
the two ways of composing compare.

Beside the accuracies, each run records what explains them:

* ``*_m_A_probe``: how readable the value is in m_A's states, per block output (what a
  connection reads) at the answer position (the ``:`` token) and at the last key token: a
  ridge-regression probe fitted on the composition's training keys, scored on the held-out keys;
* ``*_attention``: per connection, where the anchor's query at the answer position attends
  (mean over held-out keys and heads): the null slot, the last visible augmenting token, the
  ones before it;
* ``*_curve``: training-key and held-out accuracy every ``--eval-every`` composition steps.

**cost** (default):

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


LETTERS = "abcdefgh"


def kv_lines(seed: int, n_keys: int = 128) -> tuple[dict[str, str], list[str], list[str]]:
    """``{key: digit}``, training keys, held-out keys."""
    import random

    rng = random.Random(seed)
    keys = sorted({"".join(rng.choice(LETTERS) for _ in range(3)) for _ in range(4 * n_keys)})[:n_keys]
    rng.shuffle(keys)
    table = {k: str(rng.randrange(10)) for k in keys}
    return table, keys[: n_keys // 2], keys[n_keys // 2 :]


def _encode_lines(tok, lines: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and the index of the value digit (the last real token)."""
    enc = [tok(line)["input_ids"] for line in lines]
    width = max(map(len, enc))
    ids = torch.full((len(enc), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids, mask, mask.sum(1) - 1


def _train_lm(
    model,
    tok,
    make_lines,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    value_only: bool = False,
    weight_decay: float = 0.0,
    every: int = 0,
    callback=None,
):
    """Next-token training on lines from ``make_lines(rng, batch)`` (all trainable parameters).

    ``callback(step)`` runs every ``every`` steps (in eval mode; it must not draw random numbers).
    """
    import random

    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    for step in range(1, steps + 1):
        ids, mask, last = _encode_lines(tok, make_lines(rng, batch))
        labels = ids.masked_fill(mask == 0, -100)
        if value_only:
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[torch.arange(len(ids)), last] = True
            labels = labels.masked_fill(~keep, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if callback is not None and every and step % every == 0:
            model.eval()
            callback(step)
            model.train()
    model.eval()


@torch.no_grad()
def _accuracy(model, tok, table: dict[str, str], keys: list[str]) -> float:
    ids, mask, last = _encode_lines(tok, [f"{k}:{table[k]}" for k in keys])
    logits = model(input_ids=ids, attention_mask=mask).logits
    rows = torch.arange(len(ids))
    return float((logits[rows, last - 1].argmax(-1) == ids[rows, last]).float().mean())


@torch.no_grad()
def _forward_with_hooks(model, ids: torch.Tensor, mask: torch.Tensor, modules, hook) -> None:
    """One forward pass of ``model`` with ``hook`` as a forward hook on each of ``modules``."""
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()


def _block_outputs(model, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each block's output (what a CALM connection reads), ``[batch, seq, hidden]`` per block."""
    from compose import arch

    seen: list[torch.Tensor] = []
    _forward_with_hooks(
        model,
        ids,
        mask,
        arch.get_blocks(model),
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out),
    )
    return seen


@torch.no_grad()
def _probe(aug, tok, table: dict[str, str], train_keys: list[str], eval_keys: list[str]) -> dict[str, dict]:
    """Held-out accuracy of a ridge probe of the value digit on m_A's block outputs.

    At the answer position (the token before the digit: ``:``) and at the last key token;
    fitted on the composition's training keys, scored on its held-out keys.
    """
    keys = train_keys + eval_keys
    ids, mask, last = _encode_lines(tok, [f"{k}:{table[k]}" for k in keys])
    values = torch.tensor([int(table[k]) for k in keys])
    target = torch.nn.functional.one_hot(values, 10).float()
    n, rows = len(train_keys), torch.arange(len(keys))
    out = {}
    for layer, h in enumerate(_block_outputs(aug, ids, mask)):
        scores = {}
        for where, back in (("answer", 1), ("last_key_token", 2)):
            x = torch.cat([h[rows, last - back].float(), torch.ones(len(keys), 1)], 1)
            a = x[:n]
            w = torch.linalg.solve(a.T @ a + 1e-2 * torch.eye(a.shape[1]), a.T @ target[:n])
            scores[where] = float(((x[n:] @ w).argmax(1) == values[n:]).float().mean())
        out[f"block {layer}"] = scores
    return out


@torch.no_grad()
def _attention(model, tok, table: dict[str, str], keys: list[str]) -> list[dict[str, float]]:
    """Per connection: where the query at the answer position attends, mean over rows and heads.

    ``null``: the null slot; ``last_visible``: the last augmenting token that query may read;
    ``earlier``: the visible ones before it. Recomputed from each connection's inputs.
    """
    ids, mask, last = _encode_lines(tok, [f"{k}:{table[k]}" for k in keys])
    rows = torch.arange(len(ids))
    found: list[dict[str, float]] = []

    def hook(conn, args, _out):
        hidden, k, _v, visible = args
        x = hidden.to(conn.q.weight.dtype)
        if conn.q_norm is not None:
            x = conn.q_norm(x)
        q = conn._heads(conn.q(x))[rows, :, last - 1]  # [B, heads, head_dim]
        k = k[rows]  # [B, heads, S, head_dim]
        seen = visible[rows, last - 1]  # [B, S]
        scores = torch.einsum("bhd,bhsd->bhs", q, k) / conn.head_dim**0.5
        scores = scores.masked_fill(~seen[:, None], float("-inf"))
        if conn.null_k is not None:
            null = torch.einsum("bhd,hd->bh", q, conn.null_k[:, 0])[..., None] / conn.head_dim**0.5
            scores = torch.cat([null, scores], -1)
        p = scores.softmax(-1).mean(1)  # [B, (1 +) S]
        null = p[:, 0] if conn.null_k is not None else torch.zeros(len(rows))
        p = p[:, 1:] if conn.null_k is not None else p
        lv = seen.long().cumsum(-1).argmax(-1)  # index of the last visible augmenting token
        last_visible = p[rows, lv]
        found.append(
            {
                "null": float(null.mean()),
                "last_visible": float(last_visible.mean()),
                "earlier": float((p.sum(-1) - last_visible).mean()),
            }
        )

    _forward_with_hooks(model, ids, mask, model.connections, hook)
    return found


def learn(args) -> dict:
    import random

    from compose.testing import tiny_model, tiny_tokenizer

    table, train_keys, eval_keys = kv_lines(args.seed)
    # the anchor's tokenizer: byte-level BPE over key:digit lines (keys merge into few tokens)
    rng = random.Random(99)
    corpus = ["".join(rng.choice(LETTERS) for _ in range(3)) + f":{rng.randrange(10)}" for _ in range(3000)]
    bpe = byte_bpe(corpus, 400)
    if args.aug_tokenizer == "chars":
        other = tiny_tokenizer()
    else:  # another byte-level BPE: fewer merges, trained on other lines
        rng2 = random.Random(7)
        other = byte_bpe(
            ["".join(rng2.choice(LETTERS) for _ in range(3)) + f":{rng2.randrange(10)}" for _ in range(500)], 300
        )
    keys = list(table)

    def memorise(rng, n):
        return [f"{k}:{table[k]}" for k in rng.choices(keys, k=n)]

    def fmt(rng, n):
        return ["".join(rng.choice(LETTERS) for _ in range(3)) + f":{rng.randrange(10)}" for _ in range(n)]

    def composition_lines(rng, n):
        return [f"{k}:{table[k]}" for k in rng.choices(train_keys, k=n)]

    torch.manual_seed(args.seed)
    anchor = tiny_model("llama", seed=args.seed, hidden=64, layers=2, heads=4, vocab=len(bpe))
    _train_lm(anchor, bpe, fmt, args.anchor_steps, 3e-3, 64, args.seed)
    out = {
        "seed": args.seed,
        "last_only": args.last_only,
        "aug_tokenizer": args.aug_tokenizer,
        "aug_weight_decay": args.aug_weight_decay,
        "calm_steps": args.calm_steps,
        "anchor_heldout_acc": _accuracy(anchor, bpe, table, eval_keys),
    }
    for name, tok in (("same_tokenizer", bpe), ("cross_tokenizer", other)):
        aug = tiny_model("llama", seed=args.seed + 1, hidden=96, layers=2, heads=4, vocab=len(tok))
        _train_lm(aug, tok, memorise, args.aug_steps, 3e-3, 64, args.seed + 1, weight_decay=args.aug_weight_decay)
        out[f"{name}_m_A_acc"] = _accuracy(aug, tok, table, keys)
        out[f"{name}_m_A_probe"] = _probe(aug, tok, table, train_keys, eval_keys)
        where = {"connections": [(-1, -1)]} if args.last_only else {"every": 1}
        c = Composer(
            anchor, aug, strategy="calm", tokenizer=bpe, augment_tokenizer=tok, null_kv=True, norm=True, **where
        )
        assert c.model.is_cross_tokenizer == (name == "cross_tokenizer")
        curve = []

        def record(step, model=c.model, curve=curve):
            curve.append([step, _accuracy(model, bpe, table, train_keys), _accuracy(model, bpe, table, eval_keys)])

        t, cpu = time.perf_counter(), time.process_time()
        _train_lm(
            c.model,
            bpe,
            composition_lines,
            args.calm_steps,
            3e-3,
            64,
            args.seed + 2,
            value_only=True,
            every=args.eval_every,
            callback=record,
        )
        out[f"{name}_calm_s"] = time.perf_counter() - t
        out[f"{name}_calm_cpu_s"] = time.process_time() - cpu
        out[f"{name}_train_acc"] = _accuracy(c.model, bpe, table, train_keys)
        out[f"{name}_heldout_acc"] = _accuracy(c.model, bpe, table, eval_keys)
        out[f"{name}_curve"] = curve
        out[f"{name}_attention"] = _attention(c.model, bpe, table, eval_keys)
        print(name, {k: v for k, v in out.items() if k.startswith(name) and not k.endswith("curve")}, flush=True)
    out["ratio"] = out["cross_tokenizer_heldout_acc"] / max(out["same_tokenizer_heldout_acc"], 1e-9)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", nargs="?", choices=["cost", "learn"], default="cost")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--anchor-steps", type=int, default=300)
    ap.add_argument("--aug-steps", type=int, default=1500)
    ap.add_argument("--calm-steps", type=int, default=400)
    ap.add_argument(
        "--aug-weight-decay",
        type=float,
        default=0.1,
        help="AdamW weight decay of m_A's memorisation training (0 leaves the value hard to read: docs/calm.md)",
    )
    ap.add_argument("--eval-every", type=int, default=50, help="learn: accuracy curve every N composition steps")
    ap.add_argument(
        "--aug-tokenizer", choices=["chars", "bpe"], default="chars", help="m_A's tokenizer in the cross run"
    )
    ap.add_argument(
        "--last-only",
        action="store_true",
        help="one connection, m_A's last layer into the anchor's last (default: every layer)",
    )
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.mode == "learn":
        result = learn(args)
        result["machine"] = f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)"
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        return

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
