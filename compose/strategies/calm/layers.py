"""The trainable part of CALM: a projection plus cross-attention per connection, and who sees what.

:class:`CrossConnection` projects an augmenting model's states to the anchor's width and
cross-attends to them from the anchor's stream; its output projection starts at zero, so
the composition equals the anchor until trained. A visibility function decides which
augmenting positions an anchor position may read: :func:`causal_visibility` (``s <= t``,
never padding) by default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import PreTrainedModel

from ... import arch

__all__ = [
    "CrossConnection",
    "StopForward",
    "Visibility",
    "anchor_input_rms",
    "causal_visibility",
    "windowed_visibility",
]

#: A visibility function: ``(query_index [q], key_index [kv], key_mask [B, kv]) -> [B, q, kv]`` bool,
#: True where an anchor query may attend to an augmenting key. Indices are token positions
#: in the (padded) input sequence.
Visibility = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal_visibility(query_index: torch.Tensor, key_index: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Same tokenizer: anchor token ``t`` sees augmenting tokens ``s <= t`` that are not padding.

    A cross-tokenizer alignment plugs in here with the same signature, mapping each
    anchor token to the augmenting tokens whose character span ends at or before its own.
    """
    causal = key_index[None, None, :] <= query_index[None, :, None]
    return causal & key_mask.bool()[:, None, :]


def windowed_visibility(window: int | None) -> Visibility:
    """:func:`causal_visibility` limited to the last ``window`` positions (``t - window < s <= t``).

    ``None`` is :func:`causal_visibility` itself. Positions are indices in the padded
    sequence; left padding shifts queries and keys alike, so the window is unchanged.
    """
    if window is None:
        return causal_visibility

    def visibility(query_index: torch.Tensor, key_index: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        near = key_index[None, None, :] > query_index[None, :, None] - window
        return causal_visibility(query_index, key_index, key_mask) & near

    return visibility


class StopForward(Exception):
    """Raised by a hook on an augmenting model's highest used layer to skip the layers above it."""


@torch.no_grad()
def anchor_input_rms(anchor: PreTrainedModel, max_tokens: int = 4096) -> float:
    """RMS of what the anchor's first block receives, over (a spread sample of) its vocabulary.

    Measured, not read off the embedding matrix, so that a family's embedding multiplier
    (Gemma's ``sqrt(hidden)``) or added position embeddings (GPT-2) are included. Every
    token is a one-token sequence at position 0; the blocks themselves never run.
    """
    vocab = anchor.get_input_embeddings().weight.shape[0]
    device = next(anchor.parameters()).device
    ids = torch.linspace(0, vocab - 1, min(vocab, max_tokens), device=device).long().unique()[:, None]
    seen: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])
        raise StopForward

    handle = arch.get_blocks(anchor)[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        anchor.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{type(anchor).__name__}'s first block never ran; cannot measure its input scale")
    return float(seen[0].float().pow(2).mean().sqrt())


class CrossConnection(nn.Module):
    """Projection ``D_A -> D_B`` plus multi-head cross-attention into the anchor stream.

    ``o`` (the output projection) is zero-initialised, so the connection adds exactly 0
    until trained. With ``gate=True``, ``o`` is random and a tanh gate at 0 plays that role.
    With ``null_kv=True`` every query also sees a learned key/value pair (``null_k``,
    ``null_v``, one per head, initialised at 0) that stands for "nothing to read".
    ``scale`` (a buffer, saved with the weights) multiplies the output.
    """

    def __init__(
        self,
        d_augment: int,
        d_anchor: int,
        num_heads: int,
        *,
        norm: bool = False,
        gate: bool = False,
        null_kv: bool = False,
        scale: float = 1.0,
    ):
        super().__init__()
        if d_anchor % num_heads:
            raise ValueError(
                f"the anchor's hidden size {d_anchor} is not divisible by {num_heads} cross-attention heads; "
                "pass num_heads= that divides it"
            )
        self.num_heads = num_heads
        self.head_dim = d_anchor // num_heads
        self.proj = nn.Linear(d_augment, d_anchor)
        self.kv_norm = nn.LayerNorm(d_anchor) if norm else None
        self.q_norm = nn.LayerNorm(d_anchor) if norm else None
        self.q = nn.Linear(d_anchor, d_anchor, bias=False)
        self.k = nn.Linear(d_anchor, d_anchor, bias=False)
        self.v = nn.Linear(d_anchor, d_anchor, bias=False)
        self.o = nn.Linear(d_anchor, d_anchor, bias=False)
        self.register_buffer("scale", torch.tensor(float(scale)))
        if null_kv:
            self.null_k = nn.Parameter(torch.zeros(num_heads, 1, self.head_dim))
            self.null_v = nn.Parameter(torch.zeros(num_heads, 1, self.head_dim))
        else:
            self.null_k = self.null_v = None
        if gate:
            self.gate = nn.Parameter(torch.zeros(1))
        else:
            self.gate = None
            nn.init.zeros_(self.o.weight)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b n (h d) -> b h n d", h=self.num_heads)

    def keys_values(self, augment_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project augmenting states ``[B, S, D_A]`` to keys and values ``[B, heads, S, head_dim]``."""
        x = self.proj(augment_hidden.to(self.proj.weight.dtype))
        if self.kv_norm is not None:
            x = self.kv_norm(x)
        return self._heads(self.k(x)), self._heads(self.v(x))

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor):
        """What to add to the anchor's ``hidden [B, q, D_B]``; ``visible [B, q, kv]`` says who sees what."""
        x = hidden.to(self.q.weight.dtype)
        if self.q_norm is not None:
            x = self.q_norm(x)
        q = self._heads(self.q(x))
        # A query that sees no key (a padded position, or a left-padded row before its first
        # token) would get NaN from softmax over nothing; let it see everything and zero its output.
        any_visible = visible.any(-1)
        mask = (visible | ~any_visible[..., None])[:, None]
        if self.null_k is not None:
            b = keys.shape[0]
            keys = torch.cat([self.null_k.to(keys.dtype).expand(b, -1, -1, -1), keys], dim=2)
            values = torch.cat([self.null_v.to(values.dtype).expand(b, -1, -1, -1), values], dim=2)
            mask = F.pad(mask, (1, 0), value=True)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out * any_visible[:, None, :, None].to(out.dtype)
        out = self.o(rearrange(out, "b h n d -> b n (h d)"))
        if self.gate is not None:
            out = torch.tanh(self.gate) * out
        return (out * self.scale.to(out.dtype)).to(hidden.dtype)
