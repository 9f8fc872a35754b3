"""Tokenized documents -> packed (or truncated) blocks of at most ``seq_len`` tokens, as Arrow tables."""

from __future__ import annotations

from typing import Any

import numpy as np

from .columns import IGNORE, _list_array
from .tokenize import _Tokenize


class _Pack:
    """Batched map: tokenized documents -> blocks of at most ``seq_len`` tokens (numpy, no Python per token).

    Takes and returns Arrow tables (or, for streaming, dicts of lists); a document's null
    ``labels`` means "same as its input_ids".
    """

    def __init__(self, seq_len: int, packing: bool, reset_position_ids: bool, arrow_out: bool = True):
        self.seq_len, self.packing, self.reset, self.arrow_out = seq_len, packing, reset_position_ids, arrow_out

    def __call__(self, batch) -> Any:
        import pyarrow as pa
        import pyarrow.compute as pc

        if not isinstance(batch, pa.Table):
            batch = pa.table({k: pa.array(batch[k], type=pa.list_(pa.int32())) for k in ("input_ids", "labels")})
        ids_col = batch.column("input_ids").combine_chunks()
        labels_col = pc.coalesce(batch.column("labels").combine_chunks(), ids_col)
        lengths = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False).astype(np.int64)
        ids = pc.list_flatten(ids_col).to_numpy(zero_copy_only=False)
        labels = pc.list_flatten(labels_col).to_numpy(zero_copy_only=False)
        doc_starts = np.cumsum(lengths) - lengths
        if self.packing:
            offsets = np.append(np.arange(0, ids.size, self.seq_len), ids.size)
            # restart at each document and at each block (a long document's next block starts over)
            index = np.arange(ids.size)
            positions = np.minimum(index - np.repeat(doc_starts, lengths), index % self.seq_len) if self.reset else None
            if self.reset:  # a document's first token is not predicted from the one before it, in another document
                labels = labels.copy()
                labels[doc_starts[(lengths > 0) & (doc_starts < labels.size)]] = IGNORE
        else:
            take = np.minimum(lengths, self.seq_len)[lengths > 0]
            out_starts = np.cumsum(take) - take
            index = np.arange(int(take.sum())) + np.repeat(doc_starts[lengths > 0] - out_starts, take)
            ids, labels = ids[index], labels[index]
            offsets = np.append(out_starts, int(take.sum()))
            positions = np.arange(ids.size) - np.repeat(out_starts, take) if self.reset else None
        return self._table(offsets, ids, labels, positions)

    def _table(self, offsets: np.ndarray, ids: np.ndarray, labels: np.ndarray, positions) -> Any:
        import pyarrow as pa

        n = len(offsets) - 1
        targets = np.add.reduceat((labels != IGNORE).astype(np.int32), offsets[:-1]) if n > 0 else np.zeros(0)
        cols = {
            "input_ids": _list_array(offsets, ids),
            "labels": _list_array(offsets, labels),
            "targets": pa.array(targets.astype(np.int32)),
        }
        if self.reset:
            cols["position_ids"] = _list_array(offsets, positions)
        table = pa.table(cols)
        return table if self.arrow_out else table.to_pydict()


class _TokenizePack:
    """Batched map: one group of records -> its blocks (the same groups as tokenizing, then packing)."""

    def __init__(self, tokenize: _Tokenize, pack: _Pack):
        self.tokenize, self.pack = tokenize, pack

    def __call__(self, batch: dict[str, list], indices: list[int]) -> Any:
        return self.pack(self.tokenize(batch, indices))
