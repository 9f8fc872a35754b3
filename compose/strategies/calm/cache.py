"""The composite KV cache of a CALM composition, driven by transformers' own ``generate``.

A :class:`CalmCache` holds, in the way ``EncoderDecoderCache`` holds two caches:

* the anchor's own cache (a ``DynamicCache`` built from the anchor's config, so sliding
  window layers stay sliding),
* one cache per augmenting model (only the layers up to the highest one a connection reads
  are ever written, since the augmenting model stops there),
* the projected keys and values of every connection, ``[batch, heads, seen, head_dim]``,
  so that a new token projects only itself;
* for an augmenting model with its own tokenizer, one :class:`~compose.strategies.calm.xtok.RowState`
  per row instead (its own cache and projected keys/values: rows re-tokenise and drop a
  different number of trailing augmenting tokens at each step).

Beam search reorders all of them together (:meth:`CalmCache.reorder_cache`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Cache, DynamicCache, PreTrainedModel

from .xtok import RowState

__all__ = ["CalmCache"]


class CalmCache(Cache):
    """Anchor cache + augmenting caches + per-connection projected keys/values.

    Args:
        anchor: the anchor's cache.
        augments: one cache per augmenting model.
        num_connections: how many connections keep projected keys/values.

    ``get_seq_length()`` is the number of tokens seen so far (padding included), the same for
    every part.

    >>> from compose.testing import tiny_model
    >>> cache = CalmCache.for_models(tiny_model("llama"), [tiny_model("gpt2")], num_connections=2)
    >>> cache.get_seq_length(), len(cache.keys)
    (0, 2)
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, anchor: Cache, augments: list[Cache], num_connections: int):
        # Like EncoderDecoderCache, a container of caches: no layers of its own.
        self.anchor = anchor
        self.augments = list(augments)
        self.keys: list[torch.Tensor | None] = [None] * num_connections
        self.values: list[torch.Tensor | None] = [None] * num_connections
        self.length = 0
        #: per augmenting model, per row: cross-tokenizer state (empty for same-vocabulary models)
        self.cross: list[list[RowState]] = [[] for _ in self.augments]

    def cross_rows(self, index: int, batch: int) -> list[RowState]:
        """Augmenting model ``index``'s per-row states, created at the first call."""
        rows = self.cross[index]
        if not rows:
            rows.extend(RowState() for _ in range(batch))
        if len(rows) != batch:
            raise ValueError(f"the cache holds {len(rows)} rows for augmenting model {index}, the input has {batch}")
        return rows

    def _each_row(self, pick) -> None:
        """Replace every cross-tokenizer row list by ``pick(rows)`` (rows copied, so beams never share one)."""
        for i, rows in enumerate(self.cross):
            if rows:
                self.cross[i] = [r.clone() for r in pick(rows)]

    @classmethod
    def resolve(
        cls, cache: Any, use_cache: bool | None, anchor: PreTrainedModel, augments: list[PreTrainedModel], n: int
    ) -> CalmCache | None:
        """The cache a forward call works with: the one given (it must be a CalmCache), or a new one if wanted."""
        if cache is not None and not isinstance(cache, CalmCache):
            raise TypeError(
                f"a CALM composition keeps a CalmCache, got {type(cache).__name__}; pass the cache a previous "
                "call returned, or none (generate builds its own)"
            )
        if cache is None and use_cache:
            cache = cls.for_models(anchor, augments, n)
        return cache

    @classmethod
    def for_models(cls, anchor: PreTrainedModel, augments: list[PreTrainedModel], num_connections: int) -> CalmCache:
        """Empty dynamic caches shaped after each model's config."""
        return cls(
            DynamicCache(config=anchor.config), [DynamicCache(config=a.config) for a in augments], num_connections
        )

    def __repr__(self) -> str:
        return f"CalmCache(length={self.length}, anchor={self.anchor!r}, augments={len(self.augments)}, connections={len(self.keys)})"

    def __len__(self) -> int:
        return len(self.anchor)

    @property
    def layers(self):
        """The anchor's cache layers (what transformers inspects to decide masking and compilation)."""
        return self.anchor.layers

    # ------------------------------------------------------------------ growth
    def append(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add connection ``index``'s keys/values of the new tokens; return all of them so far."""
        if self.keys[index] is not None:
            keys = torch.cat([self.keys[index], keys], dim=2)
            values = torch.cat([self.values[index], values], dim=2)
        self.keys[index], self.values[index] = keys, values
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.anchor.get_mask_sizes(query_length, layer_idx)

    @property
    def is_sliding(self) -> list[bool]:
        return self.anchor.is_sliding

    @property
    def is_linear(self) -> list[bool]:
        return self.anchor.is_linear

    @property
    def is_dummy(self) -> list[bool]:
        return self.anchor.is_dummy

    # ------------------------------------------------------------------ batch edits (beam search)
    def _each_tensor(self, fn) -> None:
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = fn(k), fn(v)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep, for each row, the beam ``beam_idx`` says it continues (every part alike)."""
        for cache in [self.anchor, *self.augments]:
            cache.reorder_cache(beam_idx)
        self._each_tensor(lambda t: t.index_select(0, beam_idx.to(t.device)))
        self._each_row(lambda rows: [rows[int(i)] for i in beam_idx])

    def batch_repeat_interleave(self, repeats: int) -> None:
        for cache in [self.anchor, *self.augments]:
            cache.batch_repeat_interleave(repeats)
        self._each_tensor(lambda t: t.repeat_interleave(repeats, dim=0))
        self._each_row(lambda rows: [r for r in rows for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for cache in [self.anchor, *self.augments]:
            cache.batch_select_indices(indices)
        self._each_tensor(lambda t: t[indices])
        chosen = torch.as_tensor(indices).cpu()
        if chosen.dtype == torch.bool:
            chosen = chosen.nonzero().flatten()
        self._each_row(lambda rows: [rows[i] for i in chosen.tolist()])

    def reset(self) -> None:
        for cache in [self.anchor, *self.augments]:
            cache.reset()
        self.keys = [None] * len(self.keys)
        self.values = [None] * len(self.values)
        self.length = 0
        self.cross = [[] for _ in self.augments]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a CALM cache cannot be cropped (assisted / speculative decoding is not supported); "
            "call generate without assistant_model or prompt_lookup_num_tokens"
        )

    def activate_past_recording(self) -> None:
        raise NotImplementedError("a CALM composition cannot serve as an assistant model in assisted decoding")
