"""Token-id rows -> padded LongTensors, and the pad id a model's blocks use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from .columns import IGNORE


def pad_id_of(config: Any) -> int:
    """The id that pads a model's blocks: its config's (or a tokenizer's) ``pad_token_id`` when that is a
    token id, else 0.

    Padding is masked out of attention and loss, so the id only has to be a valid embedding row.
    """
    pad = getattr(config, "pad_token_id", None)
    return pad if isinstance(pad, int) and pad >= 0 else 0


def generation_pad_id(tokenizer: Any, config: Any) -> int:
    """The id that pads prompts for generation: the tokenizer's pad, else its EOS, else the model
    config's pad, else its EOS (the first of a list), else 0."""
    for obj in (tokenizer, config):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(obj, attr, None) if obj is not None else None
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int) and value >= 0:
                return value
    return 0


def pad_batch(
    rows: Sequence[Sequence[int]], pad_token_id: int, *, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` of token ids as one ``(input_ids, attention_mask)`` batch, padded on ``side`` to the longest row."""
    ids = [torch.as_tensor(list(r), dtype=torch.long) for r in rows]
    input_ids = pad_sequence(ids, batch_first=True, padding_value=pad_token_id, padding_side=side)
    mask = pad_sequence([torch.ones_like(r) for r in ids], batch_first=True, padding_value=0, padding_side=side)
    return input_ids, mask


def _pad_rows(rows: dict[str, Any], seq_len: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    rows.pop("targets", None)
    n = len(rows["input_ids"])
    out = {
        "input_ids": torch.full((n, seq_len), pad_token_id, dtype=torch.long),
        "labels": torch.full((n, seq_len), IGNORE, dtype=torch.long),
        "attention_mask": torch.zeros((n, seq_len), dtype=torch.long),
    }
    if "position_ids" in rows:
        out["position_ids"] = torch.arange(seq_len).repeat(n, 1)
    for r in range(n):
        k = len(rows["input_ids"][r])
        out["input_ids"][r, :k] = torch.as_tensor(np.asarray(rows["input_ids"][r], dtype=np.int64))
        out["labels"][r, :k] = torch.as_tensor(np.asarray(rows["labels"][r], dtype=np.int64))
        out["attention_mask"][r, :k] = 1
        if "position_ids" in rows:
            out["position_ids"][r, :k] = torch.as_tensor(np.asarray(rows["position_ids"][r], dtype=np.int64))
    return out
