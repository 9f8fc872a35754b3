"""Training data: from whatever the user has to tokenized, packed ``seq_len`` blocks.

Accepted sources (see :func:`load_records`):

* a ``datasets.Dataset`` (or a ``DatasetDict``: its ``train`` split);
* a list of strings, or a list of dicts;
* a local ``.txt`` (documents separated by blank lines), ``.jsonl``/``.json`` or
  ``.parquet`` file;
* a hub dataset name (``datasets.load_dataset(name, split=...)``);
* for streaming (:func:`stream_blocks`), also a ``datasets.IterableDataset``.

Each record is one of ``{"input_ids": [...]}`` (used as is, optional ``"labels"``),
``{"text": ...}``, ``{"prompt": ..., "completion": ...}`` (the prompt's tokens get
label ``-100`` when ``mask_prompt``) or ``{"messages": [{"role": ..., "content": ...}, ...]}``
(rendered with the chat template, loss on the assistant's turns: :mod:`compose.chat`).
Text needs a tokenizer.

Everything runs through ``datasets``: one batched ``map`` tokenizes each group of
:data:`PACK_GROUP` records (one fast-tokenizer call) and packs it into Arrow blocks; with
``num_proc`` the records are tokenized by a ``map`` in worker processes and packed by a
second ``map`` in this one, which cuts the same groups. Files are read with ``datasets``'
own builders, so the maps are cached by fingerprint next to the Arrow files and a second
run with the same data, tokenizer and settings reuses them. Token ids never live in Python lists beyond one batch of documents.
A text longer than :data:`compose.longdoc.LONG_CHARS` is read, tokenized and packed in bounded pieces
(:mod:`compose.longdoc`), so memory does not follow one document's size either.

Packing (``packing=True``, the default) joins the documents of each group of
:data:`PACK_GROUP` documents, each followed by EOS, and cuts the stream into ``seq_len``
blocks; the group's last block may be shorter and is padded (its padding is masked out of
the loss). With ``reset_position_ids=True`` (what ``packing_attention="document"`` asks for)
each block also carries ``position_ids`` that restart at 0 at every document and at the
block's start, a document's first token is not a target, and the model is then called so
that attention stays inside each document on every attention implementation
(:mod:`compose.packing`); without them attention is causal
over the whole block and a token sees the earlier documents of its block.
``packing=False`` truncates/pads each record to ``seq_len`` on its own.

The package's modules: :mod:`~compose.data.sources` (sources -> records),
:mod:`~compose.data.tokenize` (records -> token ids), :mod:`~compose.data.pack` (token ids ->
blocks), :mod:`~compose.data.blocks` (:func:`build_blocks`, :class:`TokenBlocks`),
:mod:`~compose.data.streaming` (:func:`stream_blocks`) and :mod:`~compose.data.recipes`
(:func:`build_data`).
"""

from __future__ import annotations

from .blocks import TokenBlocks, build_blocks, collate
from .columns import IGNORE, PACK_GROUP
from .recipes import _is_main_process, _load_source, build_data  # noqa: F401 - the recipe runner and cli use them
from .sources import check_cache_dir, check_num_proc, load_records  # noqa: F401 - checks train uses
from .streaming import TokenStream, stream_blocks
from .tokenize import _Tokenize  # noqa: F401 - tests patch its encoder

__all__ = [
    "IGNORE",
    "PACK_GROUP",
    "load_records",
    "build_blocks",
    "stream_blocks",
    "TokenBlocks",
    "TokenStream",
    "collate",
    "build_data",
]
