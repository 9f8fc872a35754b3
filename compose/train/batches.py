"""Micro-batches in a resumable order, and the data building that feeds them.

Map-style data: a pure function of ``(seed, step)``: micro-batch ``g`` takes rows
``g*B*W ... (g+1)*B*W - 1`` of an endless stream of seeded permutations, rank ``r`` the
``r``-th slice of ``B`` rows. Streaming data: each process reads its own shard in order; its
exact position is stored in every checkpoint.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from .. import arch
from ..data import TokenBlocks, build_blocks, check_cache_dir, stream_blocks
from ..data.padding import pad_id_of
from .config import TrainConfig


def _model_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no .config; composed models expose their anchor's config")
    return config


class _Order:
    """Deterministic, resumable row order: an endless stream of seeded permutations."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def rows(self, start: int, count: int) -> list[int]:
        out = []
        for r in range(start, start + count):
            epoch, pos = divmod(r, self.n)
            if epoch not in self._perms:
                self._perms = {
                    epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                }
            out.append(int(self._perms[epoch][pos]))
        return out


class _OrderedBatches:
    """Micro-batches of map-style blocks; the position is the step itself, so there is no state."""

    def __init__(self, blocks: TokenBlocks, config: TrainConfig, rank: int, world: int):
        self.blocks, self.order = blocks, _Order(len(blocks), config.seed)
        self.size, self.rank, self.world = config.batch_size, rank, world

    def next(self, g: int) -> dict[str, torch.Tensor]:
        return self.blocks.batch(self.order.rows(g * self.size * self.world + self.rank * self.size, self.size))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class _StreamBatches:
    def __init__(self, stream, size: int):
        self.stream, self.size = stream, size

    def next(self, g: int) -> dict[str, torch.Tensor]:
        return self.stream.take(self.size)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


def _make_data(model, train_data, eval_data, tokenizer, config: TrainConfig, rank: int, world: int):
    model_config = _model_config(model)
    limit = arch.max_positions(model_config)
    if limit is not None and config.seq_len > limit:
        raise ValueError(
            f"seq_len={config.seq_len} is beyond the model's {limit} positions (max_position_embeddings); "
            f"use seq_len <= {limit}"
        )
    pad = pad_id_of(model_config)
    opts = dict(
        packing=config.packing,
        mask_prompt=config.mask_prompt,
        text_field=config.text_field,
        pad_token_id=pad,
        reset_position_ids=config.reset_position_ids or config.packing_attention == "document",
        chat_template=config.chat_template,
    )
    extra = dict(num_proc=config.num_proc, cache_dir=config.data_cache_dir)
    with _datasets_progress(config.progress):
        return _build_data(train_data, eval_data, tokenizer, config, rank, world, opts, extra)


@contextlib.contextmanager
def _datasets_progress(show: bool):
    """``progress=False`` also silences datasets' tokenize/pack bars."""
    import datasets as ds_tqdm

    was_on = not ds_tqdm.are_progress_bars_disabled()
    if not show and was_on:
        ds_tqdm.disable_progress_bars()
    try:
        yield
    finally:
        if not show and was_on:
            ds_tqdm.enable_progress_bars()


def _build_data(train_data, eval_data, tokenizer, config: TrainConfig, rank: int, world: int, opts, extra):
    if config.streaming:
        if config.data_cache_dir is not None:
            check_cache_dir(config.data_cache_dir)
        batches = _StreamBatches(
            stream_blocks(train_data, tokenizer, config.seq_len, rank=rank, world=world, **opts), config.batch_size
        )
    else:
        batches = _OrderedBatches(
            build_blocks(train_data, tokenizer, config.seq_len, **opts, **extra), config, rank, world
        )
    evals = build_blocks(eval_data, tokenizer, config.seq_len, **opts, **extra) if eval_data is not None else None
    return batches, evals
