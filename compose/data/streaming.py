"""Packed blocks streamed from an ``IterableDataset``: :func:`stream_blocks` and :class:`TokenStream`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..longdoc import CONTINUES, PIECE, split_long_records, txt_records
from .columns import PACK_GROUP, _features
from .pack import _Pack
from .padding import _pad_rows
from .sources import load_records
from .tokenize import _Tokenize


class TokenStream:
    """Packed blocks streamed from an ``IterableDataset``: this process's shard, endless, resumable.

    :meth:`take` returns the next ``n`` blocks as a padded batch (starting the data over, as a
    new epoch, when it runs out); :meth:`state_dict` / :meth:`load_state_dict` hold the exact
    position (epoch + the ``datasets`` iterable state), so a resumed run reads the same blocks
    an uninterrupted one would have.
    """

    def __init__(self, make, seq_len: int, pad_token_id: int = 0):
        self._make, self.seq_len, self.pad_token_id = make, seq_len, pad_token_id
        self.epoch, self._resume_state = 0, None
        self._dataset = None
        self._iter: Iterator | None = None

    def _start(self) -> None:
        self._dataset = self._make(self.epoch)
        if self._resume_state is not None:
            self._dataset.load_state_dict(self._resume_state)
            self._resume_state = None
        self._iter = iter(self._dataset)

    def take(self, n: int) -> dict[str, torch.Tensor]:
        rows: dict[str, list] = {}
        empty_epochs = 0
        while len(rows.get("input_ids", ())) < n:
            if self._iter is None:
                self._start()
            try:
                row = next(self._iter)
            except StopIteration:
                empty_epochs = empty_epochs + 1 if not rows else 0
                if empty_epochs > 1:
                    raise ValueError("the streamed dataset yields no blocks (no records, or all empty)") from None
                self.epoch, self._iter = self.epoch + 1, None
                continue
            for k, v in row.items():
                rows.setdefault(k, []).append(v)
        return _pad_rows(rows, self.seq_len, self.pad_token_id)

    def state_dict(self) -> dict[str, Any]:
        state = self._dataset.state_dict() if self._dataset is not None else self._resume_state
        return {"epoch": self.epoch, "dataset": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self._resume_state, self._iter = int(state["epoch"]), state["dataset"], None


def _stream_columns(ds) -> list[str]:
    if ds.column_names is not None:
        return list(ds.column_names)
    first = next(iter(ds), None)
    return sorted(first) if first is not None else []


def _check_stream(ds, columns: list[str], text_field: str, world: int) -> None:
    """Refuse a stream without a column to tokenize, or with fewer shards than processes."""
    known = text_field in columns or "input_ids" in columns or "messages" in columns
    if not known and not {"prompt", "completion"} <= set(columns):
        raise ValueError(
            f"the streamed dataset has no {text_field!r} column (columns: {', '.join(columns) or 'none'}); "
            "set text_field to the column holding the text, or give 'input_ids', 'prompt' + 'completion' or 'messages'"
        )
    if ds.num_shards < world:
        raise ValueError(
            f"the streamed dataset has {ds.num_shards} shard(s) (files) for {world} processes; each process needs "
            f"its own: split the corpus into at least {world} files (or to_iterable_dataset(num_shards={world})), "
            "or train without streaming"
        )


def stream_blocks(
    source: Any,
    tokenizer=None,
    seq_len: int = 512,
    *,
    packing: bool = True,
    mask_prompt: bool = True,
    text_field: str = "text",
    split: str = "train",
    pad_token_id: int = 0,
    rank: int = 0,
    world: int = 1,
    reset_position_ids: bool = False,
    chat_template: str | None = None,
) -> TokenStream:
    """Tokenize and pack ``source`` on the fly, this process's shard only (``split_dataset_by_node``).

    The corpus must have at least ``world`` shards (files, or ``to_iterable_dataset(num_shards=)``)
    so that each process reads its own files. No shuffle buffer is used: its content could not
    be restored on resume.
    """
    from datasets.distributed import split_dataset_by_node

    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    ds = txt_records(source, text_field, None, streaming=True) if packing else None
    if ds is None:
        ds = load_records(source, split=split, text_field=text_field, streaming=True)
    columns = _stream_columns(ds)
    _check_stream(ds, columns, text_field, world)
    if world > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world)
    if packing and text_field in columns and PIECE not in columns:
        ds = split_long_records(ds, text_field, streaming=True)
        columns = [*columns, PIECE, CONTINUES]

    def make(epoch: int):
        tokenized = ds.map(
            _Tokenize(tokenizer, text_field, mask_prompt, arrow_out=False, chat_template=chat_template),
            batched=True,
            with_indices=True,
            remove_columns=columns,
            features=_features(False),
        )
        return tokenized.map(
            _Pack(seq_len, packing, reset_position_ids, arrow_out=False),
            batched=True,
            batch_size=PACK_GROUP,
            remove_columns=["input_ids", "labels"],
            features=_features(reset_position_ids, packed=True),
        )

    return TokenStream(make, seq_len, pad_token_id)
