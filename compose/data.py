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
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from .longdoc import CONTINUES, PIECE, encode_bounded, split_long_records, txt_records

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

IGNORE = -100
PACK_GROUP = 1000
"""Documents packed together by one call of the packing map."""
_FILE_SUFFIXES = {".txt", ".jsonl", ".json", ".parquet"}
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _looks_like_path(s: str) -> bool:
    # Hub names are "name" or "org/name"; anything else that is not on disk is a missing file.
    return s.startswith((".", "/", "~")) or Path(s).suffix.lower() in _FILE_SUFFIXES or s.count("/") > 1


def check_cache_dir(cache_dir: str | os.PathLike | None) -> str | None:
    """Raise a clear error when ``cache_dir`` (or datasets' default cache) cannot be written."""
    import datasets

    target = Path(cache_dir).expanduser() if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE)
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target):
            pass
    except OSError as e:
        option = "data_cache_dir" if cache_dir is not None else "data_cache_dir (or HF_DATASETS_CACHE)"
        raise PermissionError(
            f"the data cache directory {str(target)!r} is not writable ({e.strerror or e}); "
            f"set {option} to a writable directory"
        ) from e
    return str(target) if cache_dir is not None else None


def check_num_proc(num_proc: Any) -> int | None:
    if num_proc is None:
        return None
    if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc <= 0:
        raise ValueError(f"num_proc must be a positive integer or None, got {num_proc!r}")
    return num_proc


def _from_list(items: Sequence[Any], text_field: str):
    import datasets

    if all(isinstance(x, str) for x in items):
        return datasets.Dataset.from_dict({text_field: list(items)})
    if all(isinstance(x, dict) for x in items):
        keys: dict[str, None] = {}
        for rec in items:
            keys.update(dict.fromkeys(rec))
        return datasets.Dataset.from_dict({k: [rec.get(k) for rec in items] for k in keys})
    raise TypeError("a data list must hold only strings or only dicts")


def load_records(
    source: Any, *, split: str = "train", text_field: str = "text", cache_dir: str | None = None, streaming=False
):
    """Turn a data source into a ``datasets.Dataset`` (``IterableDataset`` when ``streaming``)."""
    import datasets

    if isinstance(source, datasets.DatasetDict | datasets.IterableDatasetDict):
        if split not in source:
            raise ValueError(f"the DatasetDict has no split {split!r}; splits: {', '.join(source)}")
        source = source[split]
    if isinstance(source, datasets.IterableDataset):
        if not streaming:
            raise TypeError("an IterableDataset can only be streamed: pass streaming=True")
        return source
    if isinstance(source, datasets.Dataset):
        return source.to_iterable_dataset() if streaming else source
    if isinstance(source, str | os.PathLike):
        return _load_path(source, split, text_field, cache_dir, streaming)
    if isinstance(source, list | tuple):
        ds = _from_list(source, text_field)
        return ds.to_iterable_dataset() if streaming else ds
    raise TypeError(
        f"unsupported data source of type {type(source).__name__}; give a datasets.Dataset, a list of strings "
        "or dicts, a .txt/.jsonl/.parquet path, or a hub dataset name"
    )


def _load_path(source, split: str, text_field: str, cache_dir: str | None, streaming: bool):
    import datasets

    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path, text_field, cache_dir, streaming)
    if path.is_dir() or glob.has_magic(str(source)):
        return _read_files(_list_files(path, str(source)), text_field, cache_dir, streaming)
    if isinstance(source, os.PathLike) or _looks_like_path(str(source)):
        raise FileNotFoundError(f"data file {str(source)!r} does not exist")
    try:
        return datasets.load_dataset(str(source), split=split, cache_dir=cache_dir, streaming=streaming)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"could not load {source!r} as a local file or a hub dataset ({type(e).__name__}: {e})") from e


def _read_file(path: Path, text_field: str, cache_dir: str | None, streaming: bool):
    import datasets

    suffix = path.suffix.lower()
    if suffix not in _BUILDERS:
        raise ValueError(f"unsupported data file type {suffix!r} ({path}); use .txt, .jsonl, .json or .parquet")
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if suffix == ".txt" else {}
    try:
        ds = datasets.load_dataset(
            _BUILDERS[suffix], data_files=str(path), split="train", cache_dir=cache_dir, streaming=streaming, **kwargs
        )
    except Exception as e:  # noqa: BLE001 - located and re-raised below
        raise _explain_file_error(path, e) from e
    if suffix == ".txt":
        if text_field != "text":
            ds = ds.rename_column("text", text_field)
        ds = ds.filter(_NonBlank(text_field))
    return ds


def _list_files(path: Path, source: str) -> list[Path]:
    """The files of a directory (recursively, hidden ones skipped) or of a glob pattern, sorted."""
    if path.is_dir():
        files = [
            p for p in path.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(path).parts)
        ]
    else:
        files = [Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file()]
    if not files:
        raise FileNotFoundError(
            f"{source!r} matches no files; give a directory of text files or a glob such as 'src/**/*.py'"
        )
    return sorted(files)


def _read_files(files: list[Path], text_field: str, cache_dir: str | None, streaming: bool):
    """Several files: JSON Lines / Parquet files are read as records; any other files are text, one document each.

    One file = one document is how code corpora are fed (a module's blank lines do not split it).
    """
    import datasets

    suffixes = {p.suffix.lower() for p in files}
    for kind in ("json", "parquet"):
        if suffixes <= {s for s, b in _BUILDERS.items() if b == kind}:
            builder, kwargs = kind, {}
            break
    else:
        builder, kwargs = "text", {"sample_by": "document"}
    try:
        ds = datasets.load_dataset(
            builder,
            data_files=[str(p) for p in files],
            split="train",
            cache_dir=cache_dir,
            streaming=streaming,
            **kwargs,
        )
    except Exception as e:  # noqa: BLE001 - located and re-raised below
        bad = next((p for p in files if not _is_utf8(p)), None) if builder == "text" else None
        raise (
            _explain_file_error(bad, e)
            if bad is not None
            else ValueError(f"could not read {len(files)} files as {builder} ({type(e).__name__}: {e})")
        ) from e
    if builder == "text":
        if text_field != "text":
            ds = ds.rename_column("text", text_field)
        ds = ds.filter(_NonBlank(text_field))
    return ds


def _is_utf8(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            while f.read(1 << 20):
                pass
        return True
    except UnicodeDecodeError:
        return False


class _NonBlank:
    def __init__(self, field: str):
        self.field = field

    def __call__(self, record: dict) -> bool:
        return bool(record[self.field].strip())


def _explain_file_error(path: Path, error: Exception) -> Exception:
    """Name the file (and for JSON Lines the line) that ``datasets`` could not read."""
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        if isinstance(cause, UnicodeDecodeError):
            break
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, UnicodeDecodeError):
        return ValueError(f"{path}: not UTF-8 text ({cause.reason} at byte {cause.start}); re-encode it as UTF-8")
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.read(1)
            f.seek(0)
            lines = [] if first == "[" else f
            for lineno, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as e:
                        return ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})")
    from .validation import check_data_file

    try:  # empty, a line that is not a JSON object, a text that is not a string: named with its line
        check_data_file(path)
    except ValueError as e:
        return e
    return ValueError(f"could not read {path} ({type(error).__name__}: {error})")


# ---------------------------------------------------------------------------- tokenize
class _Tokenize:
    """Batched map: records -> ``input_ids`` + ``labels`` (picklable, so ``num_proc`` works)."""

    def __init__(
        self, tokenizer, text_field: str, mask_prompt: bool, arrow_out: bool = True, chat_template: str | None = None
    ):
        self.tokenizer, self.text_field, self.mask_prompt = tokenizer, text_field, mask_prompt
        self.arrow_out, self.chat_template = arrow_out, chat_template
        self.eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None

    def _encode(self, texts: list[str], special: bool, where: list[int], flags=None) -> list[list[int]]:
        if not texts:
            return []
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            value = texts[bad]
            raise ValueError(f"record {where[bad]} holds {value!r:.40} ({type(value).__name__}) where text is expected")
        if self.tokenizer is None:
            raise ValueError(
                f"record {where[0]} holds text but no tokenizer is known: pass tokenizer= to Composer, save the "
                "tokenizer beside the model, or give records with 'input_ids'"
            )
        # bounded tokenizer calls: a long text is encoded in pieces (compose.longdoc)
        return encode_bounded(self.tokenizer, texts, special if flags is None else flags)

    def __call__(self, batch: dict[str, list], indices: list[int]) -> Any:
        texts = batch.get(self.text_field)
        others = (batch.get(k) for k in ("input_ids", "prompt", "completion", "messages"))
        if texts is not None and None not in texts and not any(v is not None for c in others if c for v in c):
            return self._texts(texts, indices, batch.get(CONTINUES), batch.get(PIECE))
        return self._records(batch, indices)

    def _texts(self, texts: list[str], indices: list[int], continues=None, piece=None) -> Any:
        """Plain-text records: one tokenizer call, EOS appended with numpy, labels left null (= input_ids).

        Pieces of a long document (``continues`` / ``piece``, see :mod:`compose.longdoc`): special
        tokens on the first piece only, EOS after the last only.
        """
        import pyarrow as pa

        flags = None if continues is None else [(p == 0, not c) for p, c in zip(piece, continues)]
        enc = self._encode(list(texts), True, indices, flags)
        lengths = np.fromiter(map(len, enc), dtype=np.int64, count=len(enc))
        flat = np.fromiter(itertools.chain.from_iterable(enc), dtype=np.int64, count=int(lengths.sum()))
        ends = np.cumsum(lengths)
        add = np.zeros(len(enc), dtype=bool)
        if self.eos is not None:
            last = np.where(lengths > 0, flat[np.maximum(ends - 1, 0)] if flat.size else -1, -1)
            add = (lengths == 0) | (last != self.eos)
            if continues is not None:
                add &= ~np.asarray(continues, dtype=bool)
        offsets = np.zeros(len(enc) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lengths + add)
        values = np.empty(int(offsets[-1]), dtype=np.int64)
        values[np.arange(flat.size) + np.repeat(offsets[:-1] - (ends - lengths), lengths)] = flat
        values[offsets[1:][add] - 1] = self.eos if self.eos is not None else 0
        table = pa.table(
            {"input_ids": _list_array(offsets, values), "labels": pa.nulls(len(enc), type=pa.list_(pa.int32()))}
        )
        return table if self.arrow_out else table.to_pydict()

    def _records(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        n = len(indices)
        fields = ("input_ids", "labels", "prompt", "completion", "messages", self.text_field)
        col = {k: batch.get(k) or [None] * n for k in fields}
        kind = []
        for j in range(n):
            if col["input_ids"][j] is not None:
                kind.append("ids")
            elif col["prompt"][j] is not None and col["completion"][j] is not None:
                kind.append("pc")
            elif col["messages"][j] is not None:
                kind.append("chat")
            elif col[self.text_field][j] is not None:
                kind.append("text")
            else:
                keys = sorted(k for k, v in batch.items() if v[j] is not None)
                raise ValueError(
                    f"record {indices[j]} has keys {keys}; expected {self.text_field!r}, 'input_ids', "
                    "'prompt' + 'completion', or 'messages'"
                )
        pick = {k: [j for j in range(n) if kind[j] == k] for k in ("ids", "pc", "text", "chat")}
        where = {k: [indices[j] for j in v] for k, v in pick.items()}
        texts = iter(self._encode([col[self.text_field][j] for j in pick["text"]], True, where["text"]))
        prompts = iter(self._encode([col["prompt"][j] for j in pick["pc"]], True, where["pc"]))
        comps = iter(self._encode([col["completion"][j] for j in pick["pc"]], False, where["pc"]))
        chats = iter(self._chats([col["messages"][j] for j in pick["chat"]], where["chat"]))
        out_ids, out_labels = [], []
        for j in range(n):
            if kind[j] == "chat":
                ids, labels = _with_eos(*next(chats), self.eos)
            else:
                ids, labels = self._one(kind[j], j, col, texts, prompts, comps, indices[j])
            out_ids.append(ids)
            out_labels.append(labels)
        return {"input_ids": out_ids, "labels": out_labels}

    def _chats(self, conversations: list, where: list[int]) -> list[tuple[list[int], list[int]]]:
        """``messages`` records, rendered with the chat template (see :mod:`compose.chat`)."""
        if not conversations:
            return []
        from .chat import encode_chats, resolve_template

        if self.tokenizer is None:
            self._encode(["x"], False, where)  # the no-tokenizer error, naming the record
        out = encode_chats(self.tokenizer, resolve_template(self.tokenizer, self.chat_template), conversations, where)
        return out if self.mask_prompt else [(ids, list(ids)) for ids, _ in out]

    def _one(self, kind, j, col, texts, prompts, comps, index):
        if kind == "ids":
            ids = list(col["input_ids"][j])
            labels = list(col["labels"][j]) if col["labels"][j] is not None else list(ids)
            if len(labels) != len(ids):
                raise ValueError(f"record {index}: labels ({len(labels)}) and input_ids ({len(ids)}) differ in length")
            return ids, labels
        if kind == "pc":
            p, c = next(prompts), next(comps)
            ids, labels = p + c, ([IGNORE] * len(p) if self.mask_prompt else list(p)) + list(c)
        else:
            ids = next(texts)
            labels = list(ids)
        if self.eos is not None and ids and ids[-1] != self.eos:
            ids, labels = ids + [self.eos], labels + [self.eos]
        return ids, labels


def _with_eos(ids: list[int], labels: list[int], eos: int | None) -> tuple[list[int], list[int]]:
    """A chat record closed by EOS (the document separator when packing), trained when its last token is."""
    if eos is not None and ids and ids[-1] != eos:
        return ids + [eos], labels + [eos if labels[-1] != IGNORE else IGNORE]
    return ids, labels


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


# ---------------------------------------------------------------------------- map-style
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


# ---------------------------------------------------------------------------- streaming
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


# ---------------------------------------------------------------------------- recipes
def _is_main_process() -> bool:
    try:
        from accelerate import PartialState

        return PartialState().is_main_process
    except Exception:  # noqa: BLE001 - no accelerate state: a single process
        return True


def _load_source(src: Any, text_field: str, *, streaming: bool = False):
    """Records of one data source (a path / hub name, or a mapping with hub options) and its weight."""
    spec = dict(src) if isinstance(src, dict) else {"path": src}
    path = spec["path"]
    split = spec.get("split") or "train"
    if spec.get("name") or spec.get("data_dir"):
        import datasets

        records = datasets.load_dataset(
            path, spec.get("name"), data_dir=spec.get("data_dir"), split=split, streaming=streaming
        )
    else:
        records = load_records(path, split=split, text_field=text_field, streaming=streaming)
    columns = {k: v for k, v in (spec.get("columns") or {}).items() if k != v}
    if columns:
        names = records.column_names or []
        clash = [v for v in columns.values() if v in names and v not in columns]
        records = records.remove_columns(clash).rename_columns(columns)
    limit = spec.get("max_records")
    if limit is not None:
        records = records.take(limit) if streaming else records.select(range(min(limit, len(records))))
    return records, float(spec.get("weight", 1.0))


def _recipe_option(cfg, name: str, default: Any = None) -> Any:
    from omegaconf import OmegaConf

    for key in (f"data.{name}", f"train.{name}"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            return value
    return default


def _document_positions(cfg) -> bool:
    """Whether a recipe's blocks carry per-document positions (``packing_attention: document``)."""
    return cfg.data.packing_attention == "document" or bool(_recipe_option(cfg, "reset_position_ids", False))


def build_data(
    sources: Any, composer, cfg, seq_len: int | None = None, *, seed: int = 0, streaming: bool = False
) -> Any:
    """Tokenized, packed blocks of one or more recipe sources, ``weight``-ed (repeated), concatenated.

    ``streaming=True``: the sources themselves, streamed (an ``IterableDataset``; several are
    interleaved with probabilities proportional to their weights), for ``fit(..., streaming=True)``.
    """
    import datasets
    from omegaconf import OmegaConf

    if OmegaConf.is_config(sources):
        sources = OmegaConf.to_container(sources, resolve=True)
    sources = sources if isinstance(sources, list) else [sources]
    if streaming:
        loaded = [_load_source(src, cfg.data.text_field, streaming=True) for src in sources]
        if len(loaded) == 1:
            return loaded[0][0]
        total = sum(w for _, w in loaded)
        return datasets.interleave_datasets(
            [r for r, _ in loaded], probabilities=[w / total for _, w in loaded], seed=seed,
            stopping_strategy="all_exhausted",
        )  # fmt: skip
    pad = getattr(composer.model.config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and pad >= 0 else 0
    seq_len = seq_len or cfg.data.seq_len
    parts = []
    for src in sources:
        records, weight = _load_source(src, cfg.data.text_field)
        blocks = build_blocks(
            records,
            composer.tokenizer,
            seq_len,
            packing=cfg.data.packing,
            mask_prompt=cfg.data.mask_prompt,
            text_field=cfg.data.text_field,
            pad_token_id=pad,
            num_proc=_recipe_option(cfg, "num_proc"),
            cache_dir=_recipe_option(cfg, "cache_dir") or _recipe_option(cfg, "data_cache_dir"),
            reset_position_ids=_document_positions(cfg),
            chat_template=cfg.data.chat_template,
        )
        whole, frac = int(weight), weight - int(weight)
        idx = list(range(len(blocks))) * whole
        if frac:
            perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
            idx += perm[: round(frac * len(blocks))].tolist()
        parts.append(blocks.dataset.with_format(None).select(idx))
    return TokenBlocks(datasets.concatenate_datasets(parts), seq_len, pad)
