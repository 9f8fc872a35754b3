"""Map-style packed blocks (:class:`TokenBlocks`) and :func:`build_blocks`, which makes them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset as TorchDataset

from ..longdoc import split_long_records, txt_records
from .columns import IGNORE, PACK_GROUP, _features
from .pack import _Pack, _TokenizePack
from .padding import _pad_rows
from .sources import check_cache_dir, check_num_proc, load_records
from .tokenize import _Tokenize


class TokenBlocks(TorchDataset):
    """Packed blocks in an Arrow dataset; items are padded to ``seq_len`` on access.

    ``blocks[i]`` and :meth:`batch` give ``input_ids``, ``labels`` and ``attention_mask``
    (and ``position_ids`` when documents restart positions) as LongTensors of ``seq_len``.
    """

    def __init__(self, dataset, seq_len: int | torch.Tensor, pad_token_id: int | torch.Tensor = 0):
        if isinstance(dataset, torch.Tensor):  # TokenBlocks(input_ids, labels, attention_mask), as before
            built = self.from_tensors(dataset, seq_len, pad_token_id)
            dataset, seq_len, pad_token_id = built.dataset, built.seq_len, built.pad_token_id
        self.dataset, self.seq_len, self.pad_token_id = dataset.with_format("numpy"), seq_len, pad_token_id

    @classmethod
    def from_tensors(cls, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor, pad: int = 0):
        import datasets

        keep = attention_mask.bool()
        cols = {"input_ids": [r[k].tolist() for r, k in zip(input_ids, keep)]}
        cols["labels"] = [r[k].tolist() for r, k in zip(labels, keep)]
        cols["targets"] = [int((r[k] != IGNORE).sum()) for r, k in zip(labels, keep)]
        return cls(datasets.Dataset.from_dict(cols, features=_features(False, packed=True)), input_ids.shape[1], pad)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch([int(i)]).items()}

    def batch(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """Rows ``rows`` as one padded batch (one Arrow read)."""
        return _pad_rows(self.dataset[list(rows)], self.seq_len, self.pad_token_id)

    def _all(self, key: str) -> torch.Tensor:
        return self.batch(range(len(self)))[key]

    @property
    def input_ids(self) -> torch.Tensor:
        """All blocks as one padded tensor (materialises the data: for small sets)."""
        return self._all("input_ids")

    @property
    def labels(self) -> torch.Tensor:
        return self._all("labels")

    @property
    def attention_mask(self) -> torch.Tensor:
        return self._all("attention_mask")

    @property
    def num_tokens(self) -> int:
        import pyarrow.compute as pc

        lengths = pc.list_value_length(self.dataset.data.column("input_ids"))
        return int(pc.sum(lengths).as_py() or 0)

    def num_targets(self) -> int:
        """Tokens with a label (not ``-100``), from the per-block counts the packing map wrote."""
        import pyarrow.compute as pc

        table = self.dataset.data
        if "targets" in table.column_names:
            return int(pc.sum(table.column("targets")).as_py() or 0)
        return sum(
            int(pc.sum(pc.not_equal(pc.list_flatten(c), IGNORE)).as_py() or 0) for c in table.column("labels").chunks
        )


def build_blocks(
    source: Any,
    tokenizer=None,
    seq_len: int = 512,
    *,
    packing: bool = True,
    mask_prompt: bool = True,
    text_field: str = "text",
    split: str = "train",
    pad_token_id: int = 0,
    num_proc: int | None = None,
    cache_dir: str | None = None,
    reset_position_ids: bool = False,
    chat_template: str | None = None,
) -> TokenBlocks:
    """Load, tokenize and pack ``source`` into :class:`TokenBlocks` of ``seq_len`` tokens."""
    if isinstance(source, TokenBlocks):
        return source
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    num_proc = check_num_proc(num_proc)
    cache_dir = check_cache_dir(cache_dir)
    records = txt_records(source, text_field, cache_dir) if packing else None
    if records is None:
        records = load_records(source, split=split, text_field=text_field, cache_dir=cache_dir)
    if packing:  # a text longer than LONG_CHARS becomes pieces: memory does not follow one document
        records = split_long_records(records, text_field)
    if len(records) == 0:
        what = str(source) if isinstance(source, str | os.PathLike) else "the dataset"
        raise ValueError(f"{what} is empty: no records to train or evaluate on")
    num_proc = min(num_proc, len(records)) if num_proc else None
    tokenize = _Tokenize(tokenizer, text_field, mask_prompt, chat_template=chat_template)
    pack = _Pack(seq_len, packing, reset_position_ids)
    packed_features = _features(reset_position_ids, packed=True)
    common = dict(batched=True, batch_size=PACK_GROUP, remove_columns=records.column_names)
    if num_proc:  # tokenize in workers; pack here, so that the groups do not depend on num_proc
        tokenized = records.map(
            tokenize,
            with_indices=True,
            features=_features(False),
            num_proc=num_proc,
            desc="compose: tokenize",
            **common,
        )
        packed = tokenized.with_format("arrow").map(
            pack, batched=True, batch_size=PACK_GROUP, remove_columns=tokenized.column_names,
            features=packed_features, desc="compose: pack",
        )  # fmt: skip
    else:  # one map: each group's documents go straight into its blocks, no tokenized copy on disk
        packed = records.map(
            _TokenizePack(tokenize, pack), with_indices=True, features=packed_features,
            desc="compose: tokenize + pack", **common,
        )  # fmt: skip
    if len(packed) == 0:
        raise ValueError("the dataset is empty after tokenization (every record has zero tokens)")
    blocks = TokenBlocks(packed, seq_len, pad_token_id)
    if blocks.num_targets() == 0:
        raise ValueError("the dataset has no tokens to learn from (every label is masked)")
    return blocks


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
