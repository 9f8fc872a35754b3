"""Evaluation: loss and perplexity of a composed model on a dataset."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .data import build_blocks
from .train import eval_loss_sums

if TYPE_CHECKING:
    from .composer import Composer

__all__ = ["evaluate_loss"]


def evaluate_loss(
    composer: Composer,
    data: Any,
    *,
    batch_size: int = 8,
    seq_len: int | None = None,
    packing: bool = True,
    max_batches: int | None = None,
    **data_kwargs: Any,
) -> dict[str, float]:
    """``{"loss", "perplexity", "tokens"}`` of ``composer.model`` on ``data`` (token-weighted)."""
    model = composer.model
    if seq_len is None:
        seq_len = min(getattr(model.config, "max_position_embeddings", None) or 1024, 1024)
    pad = getattr(model.config, "pad_token_id", None)
    blocks = build_blocks(
        data,
        composer.tokenizer,
        seq_len,
        packing=packing,
        pad_token_id=pad if isinstance(pad, int) and pad >= 0 else 0,
        **data_kwargs,
    )
    device = next(model.parameters()).device
    total, count = eval_loss_sums(model, blocks, batch_size, device, max_batches=max_batches)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
