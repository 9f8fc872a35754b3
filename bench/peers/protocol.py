"""The measurements run on every CALM implementation, written against plain callables.

This file imports only torch, so that each implementation can be measured in the
environment it needs (google-deepmind/calm pins an old transformers). An implementation's
script builds its composition on the tiny models below and hands over:

- ``composed(ids, mask)`` and ``anchor(ids, mask)``: logits ``[B, T, V]``, called the way
  the implementation's users call it (``mask`` is ``None`` or a 0/1 ``[B, T]`` tensor);
- ``randomize()``: re-draw the trainable parameters, standing in for training (at init
  some implementations output exactly the anchor, which would hide a leak);
- ``generate(prompt, n)``: greedy decoding of ``n`` tokens, returning prompt + new tokens,
  or ``(tokens, step_logits [B, n, V])`` where the implementation can give them;
- the anchor's and the augmenting model's input embedding modules, to record how many
  tokens each model is fed per call while decoding.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

VOCAB = 96
PAD = 0
# The same tiny decoder for anchor and augment (different random weights): Gemma's layout,
# the family google-deepmind/calm is written for.
TINY_GEMMA = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=64,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=PAD,
)
# (augment_layer, anchor_layer), 0-based block indices: block outputs 1 and 3 of the
# augment feed block outputs 1 and 3 of the anchor.
CONNECTIONS = [(1, 1), (3, 3)]


@torch.no_grad()
def randomize_(params, seed: int, std: float = 0.2) -> None:
    """Re-draw ``[(name, param), ...]`` from N(0, std^2), in name order (deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(params, key=lambda kv: kv[0]):
        p.copy_(torch.randn(p.shape, generator=gen) * std)


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


class _LengthLog:
    """Records the sequence length of every call of a module (its first positional input)."""

    def __init__(self, module: torch.nn.Module):
        self.lengths: list[int] = []
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        self.lengths.append(int(x.shape[1]))

    def close(self) -> list[int]:
        self._handle.remove()
        return self.lengths


@torch.no_grad()
def measure(
    *,
    composed: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    anchor: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    randomize: Callable[[], None],
    generate: Callable[[torch.Tensor, int], torch.Tensor] | None,
    anchor_embed: torch.nn.Module,
    augment_embed: torch.nn.Module,
    seq_len: int = 16,
    pad: int = 4,
    prompt_len: int = 8,
    new_tokens: int = 8,
) -> dict:
    out: dict = {}
    ids = _ids(2, seq_len, 0)

    # 1. Identity at init: composed logits vs the anchor's, before any training.
    out["identity_max_abs_diff"] = _max_abs(composed(ids, None), anchor(ids, None))

    randomize()
    # How far the (randomised) composition moves the anchor's logits: the scale the leak
    # and padding numbers below are read against.
    out["composition_effect_max_abs_diff"] = _max_abs(composed(ids, None), anchor(ids, None))

    # 2. Future leak: change every token after position t, in what both models read, and
    # measure how much the logits at positions <= t move (0 for a causal composition).
    t = seq_len // 2 - 1
    changed = ids.clone()
    changed[:, t + 1 :] = _ids(2, seq_len - t - 1, 1)
    out["future_leak_max_abs_diff"] = _max_abs(composed(ids, None)[:, : t + 1], composed(changed, None)[:, : t + 1])

    # 3. Left padding: a row padded with `pad` masked PAD tokens vs the same row unpadded,
    # at the real positions. The anchor alone under the same call is the float-noise floor.
    row = ids[:1]
    padded = torch.cat([torch.full((1, pad), PAD, dtype=row.dtype), row], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(row)], dim=1)
    out["left_padding_max_abs_diff"] = _max_abs(composed(padded, mask)[:, pad:], composed(row, torch.ones_like(row)))
    out["left_padding_anchor_alone"] = _max_abs(anchor(padded, mask)[:, pad:], anchor(row, torch.ones_like(row)))

    # 4. Decoding: what each model is fed per call, and whether greedy decoding picks the
    # argmax of the full forward over the final sequence at every new position.
    if generate is not None:
        prompt = _ids(1, prompt_len, 2)
        anchor_log, augment_log = _LengthLog(anchor_embed), _LengthLog(augment_embed)
        try:
            tokens = generate(prompt, new_tokens)
        finally:
            anchor_lengths, augment_lengths = anchor_log.close(), augment_log.close()
        step_logits = None
        if isinstance(tokens, tuple):
            tokens, step_logits = tokens
        full = composed(tokens, None)[:, prompt_len - 1 : -1]
        new = tokens[:, prompt_len:]
        out["decode"] = {
            "new_tokens": int(new.shape[1]),
            "anchor_call_lengths": anchor_lengths,
            "augment_call_lengths": augment_lengths,
            "tokens_differing_from_full_forward_argmax": int((full.argmax(-1) != new).sum()),
        }
        if step_logits is not None:
            out["decode"]["step_logits_vs_full_forward_max_abs_diff"] = _max_abs(step_logits, full)
    return out


def report(result: dict, out: str | None) -> None:
    """Print ``result`` as JSON and, with ``out``, write it there too."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
