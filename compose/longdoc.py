"""Long documents in bounded pieces, so that memory never follows the size of one document.

A fast tokenizer holds about half a kilobyte per token while it encodes (offsets, words,
masks), and a document's token ids, packed blocks and Arrow tables all scale with it:
encoding one 50 MB record whole needs gigabytes. Two cuts keep that bounded:

* **records**: a text longer than :data:`LONG_CHARS` becomes consecutive records of at most
  :data:`PIECE_CHARS` characters, marked with ``_piece`` (its index in the document) and
  ``_continues`` (another piece follows). The tokenizer adds its special tokens (BOS) to the
  first piece only and EOS follows the last piece only, so packing joins the pieces back into
  one token stream. A ``.txt`` file holding such a paragraph is read by :func:`txt_records`,
  which never holds more than :data:`LONG_CHARS` characters of it (``datasets``' own reader
  holds the whole paragraph); other sources are split by a ``map`` (:func:`split_long_records`).
* **tokenizer calls**: :func:`encode_bounded` encodes at most :data:`CALL_CHARS` characters per
  call; a longer text is cut (:func:`split_text`) and its ids joined.

Cuts fall after a newline where there is one, else after a space, else at the size limit, so
the ids equal those of the whole text, or differ only next to a cut (a tokenizer that merges
across a line break, or adds a prefix space to every text it is given).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "LONG_CHARS",
    "PIECE_CHARS",
    "CALL_CHARS",
    "split_text",
    "encode_bounded",
    "txt_records",
    "split_long_records",
]

LONG_CHARS = 1 << 20
"""A text longer than this is split into records of :data:`PIECE_CHARS`."""
PIECE_CHARS = 1 << 14
"""Characters per piece of a long text (a group of 1000 pieces is then at most 16 M characters)."""
CALL_CHARS = 1 << 18
"""Characters per tokenizer call."""
PIECE, CONTINUES = "_piece", "_continues"
_READ_CHARS = 1 << 20


def cut_point(text: str, size: int) -> int:
    """Where to end the first piece of ``text`` (at most ``size`` characters): after a newline, a space, or at ``size``."""
    if len(text) <= size:
        return len(text)
    for sep in ("\n", " "):
        at = text.rfind(sep, size // 2, size)
        if at >= 0:
            return at + 1
    return size


def split_text(text: str, size: int | None = None) -> list[str]:
    """``text`` in consecutive pieces of at most ``size`` (:data:`PIECE_CHARS`) characters; ``"".join`` gives it back."""
    size = size or PIECE_CHARS
    pieces, start = [], 0
    while len(text) - start > size:
        cut = start + cut_point(text[start : start + size + 1], size)
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text when ``add_special_tokens=True`` (e.g. BOS)."""
    probe = "a"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    at = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), 0)
    return list(full[:at]), list(full[at + len(bare) :])


def _calls(indices: list[int], texts: list[str], limit: int) -> Iterator[list[int]]:
    """``indices`` in runs whose texts hold at most ``limit`` characters together (one text may exceed it)."""
    run: list[int] = []
    size = 0
    for i in indices:
        if run and size + len(texts[i]) > limit:
            yield run
            run, size = [], 0
        run.append(i)
        size += len(texts[i])
    if run:
        yield run


def _encode(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    # only the ids: no attention mask or token type ids to build and convert
    out = tokenizer(texts, add_special_tokens=special, return_attention_mask=False, return_token_type_ids=False)
    return out["input_ids"]


def encode_bounded(
    tokenizer: Any, texts: list[str], special: bool | list[tuple[bool, bool]], limit: int | None = None
) -> list[list[int]]:
    """Token ids of ``texts``, with at most ``limit`` characters per tokenizer call.

    ``special``: add the tokenizer's special tokens to every text, or per text ``(first, last)``:
    its prefix (BOS) only when ``first``, its suffix only when ``last`` (pieces of one document).
    A text longer than ``limit`` is cut with :func:`split_text` and its pieces' ids joined.
    """
    limit = limit or CALL_CHARS
    flags = special if isinstance(special, list) else [(bool(special), bool(special))] * len(texts)
    out: list[Any] = [None] * len(texts)
    whole = [i for i, t in enumerate(texts) if len(t) <= limit and flags[i][0] == flags[i][1]]
    for add in (True, False):  # tokenized as they are, as many per call as the limit allows
        for run in _calls([i for i in whole if flags[i][0] == add], texts, limit):
            for i, row in zip(run, _encode(tokenizer, [texts[i] for i in run], add)):
                out[i] = row
    rest = [i for i in range(len(texts)) if out[i] is None]
    prefix, suffix = special_affixes(tokenizer) if rest else ([], [])
    for i in rest:  # long texts, and pieces that take only the prefix or only the suffix
        first, last = flags[i]
        ids = list(prefix if first else [])
        for piece in split_text(texts[i], limit):
            ids.extend(_encode(tokenizer, [piece], False)[0])
        out[i] = ids + list(suffix if last else [])
    return out


# ---------------------------------------------------------------------------- .txt files
def _has_long_paragraph(path: Path) -> bool:
    """Whether ``path`` holds a paragraph (text between blank lines) of more than :data:`LONG_CHARS` bytes."""
    run = 0
    tail = b""
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHARS):
            parts = (tail + chunk).replace(b"\r\n", b"\n").split(b"\n\n")
            if len(parts) == 1:
                run += len(chunk)
            elif run + len(parts[0]) > LONG_CHARS or any(len(p) > LONG_CHARS for p in parts[1:-1]):
                return True
            else:
                run = len(parts[-1])
            if run > LONG_CHARS:
                return True
            tail = chunk[-3:]
    return False


def _txt_pieces(path: str, stamp: str = "") -> Iterator[tuple[str, bool]]:
    """``(text, first)``: paragraphs as ``datasets``' paragraph reader gives them; a long one in pieces."""
    del stamp  # part of the cache fingerprint only
    buf, long_doc, first = "", False, True
    with open(path, encoding="utf-8") as f:
        while chunk := f.read(_READ_CHARS):
            *done, buf = (buf + chunk).split("\n\n")
            for para in done:
                if long_doc:
                    yield from ((p, first and i == 0) for i, p in enumerate(split_text(para)))
                    long_doc = False
                elif para.strip():
                    yield para, True
            if not long_doc and len(buf) > LONG_CHARS:
                long_doc, first = True, True
            while long_doc and len(buf) > 2 * PIECE_CHARS:
                cut = cut_point(buf[: PIECE_CHARS + 1], PIECE_CHARS)
                yield buf[:cut], first
                buf, first = buf[cut:], False
    if long_doc:
        yield from ((p, first and i == 0) for i, p in enumerate(split_text(buf)))
    elif buf.strip():
        yield buf, True


def _txt_rows(path: str, text_field: str, stamp: str = "") -> Iterator[dict[str, Any]]:
    held, index = None, 0
    for text, first in _txt_pieces(path, stamp):
        if held is not None:
            yield {text_field: held[0], PIECE: held[1], CONTINUES: not first}
        index = 0 if first else index + 1
        held = (text, index)
    if held is not None:
        yield {text_field: held[0], PIECE: held[1], CONTINUES: False}


def _features(text_field: str):
    import datasets

    return datasets.Features(
        {text_field: datasets.Value("string"), PIECE: datasets.Value("int32"), CONTINUES: datasets.Value("bool")}
    )


def txt_records(source: Any, text_field: str, cache_dir: str | None, streaming: bool = False):
    """The records of a local ``.txt`` file holding a paragraph longer than :data:`LONG_CHARS`, read in
    pieces; ``None`` for any other source (read as usual)."""
    import datasets

    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source).expanduser()
    if path.suffix.lower() != ".txt" or not path.is_file() or not _has_long_paragraph(path):
        return None
    st = path.stat()
    kwargs = {"path": str(path.resolve()), "text_field": text_field, "stamp": f"{st.st_size}-{st.st_mtime_ns}"}
    if streaming:
        return datasets.IterableDataset.from_generator(_txt_rows, features=_features(text_field), gen_kwargs=kwargs)
    return datasets.Dataset.from_generator(
        _txt_rows, features=_features(text_field), gen_kwargs=kwargs, cache_dir=cache_dir
    )


# ---------------------------------------------------------------------------- other sources
class SplitLong:
    """Batched map: records whose text exceeds :data:`LONG_CHARS` -> consecutive piece records."""

    def __init__(self, text_field: str):
        self.text_field = text_field

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        texts = batch[self.text_field]
        out: dict[str, list] = {k: [] for k in batch}
        out.setdefault(PIECE, [])
        out.setdefault(CONTINUES, [])
        for i, text in enumerate(texts):
            long = isinstance(text, str) and len(text) > LONG_CHARS
            pieces = split_text(text) if long else [text]
            for k, values in batch.items():
                if k not in (self.text_field, PIECE, CONTINUES):
                    out[k].extend([values[i]] * len(pieces))
            out[self.text_field].extend(pieces)
            out[PIECE].extend(range(len(pieces)))
            out[CONTINUES].extend([True] * (len(pieces) - 1) + [False])
        return out


def _longest_text(records, text_field: str) -> int:
    import pyarrow as pa
    import pyarrow.compute as pc

    column = records.data.column(text_field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)) or len(column) == 0:
        return 0
    return int(pc.max(pc.utf8_length(column)).as_py() or 0)


def split_long_records(records, text_field: str, streaming: bool = False):
    """``records`` with every text longer than :data:`LONG_CHARS` split into piece records.

    A prepared dataset is only mapped when it holds such a text (its cache is otherwise
    unchanged); a stream is always mapped, a few records at a time.
    """
    import datasets

    columns = records.column_names or []
    if text_field not in columns or PIECE in columns:
        return records
    if streaming:
        return records.map(SplitLong(text_field), batched=True, batch_size=8)
    if _longest_text(records, text_field) <= LONG_CHARS:
        return records
    features = datasets.Features({**records.features, PIECE: datasets.Value("int32")})
    features[CONTINUES] = datasets.Value("bool")
    return records.map(
        SplitLong(text_field), batched=True, batch_size=1, features=features, desc="compose: split long texts"
    )
