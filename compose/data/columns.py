"""The Arrow columns of tokenized documents and packed blocks."""

from __future__ import annotations

import numpy as np

IGNORE = -100
PACK_GROUP = 1000
"""Documents packed together by one call of the packing map."""


def _list_array(offsets: np.ndarray, values: np.ndarray):
    import pyarrow as pa

    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int32)))


def _features(reset_position_ids: bool, packed: bool = False):
    import datasets

    seq = datasets.Sequence(datasets.Value("int32"))
    cols = {"input_ids": seq, "labels": seq}
    if packed:
        cols["targets"] = datasets.Value("int32")  # tokens with a label, per block
    if reset_position_ids:
        cols["position_ids"] = seq
    return datasets.Features(cols)
