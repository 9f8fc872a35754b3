"""Training data: from whatever the user has to tokenized, packed ``seq_len`` blocks.

Accepted sources (see :func:`load_records`):

* a ``datasets.Dataset`` (or a ``DatasetDict``: its ``train`` split);
* a list of strings, or a list of dicts;
* a local ``.txt`` (documents separated by blank lines), ``.jsonl``/``.json`` or
  ``.parquet`` file;
* a hub dataset name (``datasets.load_dataset(name, split=...)``).

Each record is one of ``{"input_ids": [...]}`` (used as is, optional ``"labels"``),
``{"text": ...}`` or ``{"prompt": ..., "completion": ...}`` (the prompt's tokens get
label ``-100`` when ``mask_prompt``). Text needs a tokenizer.

With ``packing=True`` (default) documents are joined with EOS and cut into blocks of
exactly ``seq_len`` tokens (the last, shorter block is padded and masked); otherwise each
record is truncated/padded to ``seq_len`` on its own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset as TorchDataset

__all__ = ["load_records", "tokenize_records", "TokenBlocks", "build_blocks", "collate"]

IGNORE = -100
_FILE_SUFFIXES = {".txt", ".jsonl", ".json", ".parquet"}


def _looks_like_path(s: str) -> bool:
    # Hub names are "name" or "org/name"; anything else that is not on disk is a missing file.
    return s.startswith((".", "/", "~")) or Path(s).suffix.lower() in _FILE_SUFFIXES or s.count("/") > 1


def load_records(source: Any, *, split: str = "train", text_field: str = "text") -> Sequence[dict] | Any:
    """Turn a data source into an indexable sequence of dict records."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None:
        if isinstance(source, datasets.DatasetDict):
            if split not in source:
                raise ValueError(f"DatasetDict has no split {split!r}; splits: {', '.join(source)}")
            source = source[split]
        if isinstance(source, datasets.Dataset):
            return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_file():
            return _read_file(path, text_field)
        if path.is_dir():
            raise ValueError(f"{path} is a directory; give a .txt/.jsonl/.parquet file or a list of records")
        if isinstance(source, os.PathLike) or _looks_like_path(str(source)):
            raise FileNotFoundError(f"data file {str(source)!r} does not exist")
        if datasets is None:
            raise ImportError("loading a hub dataset needs the `datasets` package")
        try:
            return datasets.load_dataset(str(source), split=split)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise ValueError(
                f"could not load {source!r} as a local file or a hub dataset ({type(e).__name__}: {e})"
            ) from e
    if isinstance(source, (list, tuple)):
        if all(isinstance(x, str) for x in source):
            return [{text_field: x} for x in source]
        if all(isinstance(x, dict) for x in source):
            return list(source)
        raise TypeError("a data list must hold only strings or only dicts")
    raise TypeError(
        f"unsupported data source of type {type(source).__name__}; give a datasets.Dataset, a list of strings "
        "or dicts, a .txt/.jsonl/.parquet path, or a hub dataset name"
    )


def _read_file(path: Path, text_field: str):
    suffix = path.suffix.lower()
    if suffix == ".txt":
        docs = [d.strip("\n") for d in path.read_text().split("\n\n")]
        return [{text_field: d} for d in docs if d.strip()]
    if suffix in (".jsonl", ".json"):
        text = path.read_text()
        if suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        return records
    if suffix == ".parquet":
        import datasets

        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    raise ValueError(f"unsupported data file type {suffix!r} ({path}); use .txt, .jsonl, .json or .parquet")


def tokenize_records(
    records: Sequence[dict], tokenizer=None, *, text_field: str = "text", mask_prompt: bool = True, add_eos: bool = True
) -> list[tuple[list[int], list[int]]]:
    """``[(input_ids, labels), ...]`` per record."""
    out = []
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise TypeError(f"record {i} is a {type(rec).__name__}, expected a dict")
        if "input_ids" in rec:
            ids = [int(t) for t in rec["input_ids"]]
            labels = [int(t) for t in rec["labels"]] if rec.get("labels") is not None else list(ids)
            if len(labels) != len(ids):
                raise ValueError(f"record {i}: labels ({len(labels)}) and input_ids ({len(ids)}) differ in length")
            out.append((ids, labels))
            continue
        if tokenizer is None:
            raise ValueError(
                "the data holds text but no tokenizer is known: pass tokenizer= to Composer, or save the "
                "tokenizer beside the model, or give records with 'input_ids'"
            )
        if "prompt" in rec and "completion" in rec:
            p = tokenizer(rec["prompt"], add_special_tokens=True)["input_ids"]
            c = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"]
            ids = p + c
            labels = ([IGNORE] * len(p) if mask_prompt else list(p)) + list(c)
        elif text_field in rec:
            ids = tokenizer(rec[text_field], add_special_tokens=True)["input_ids"]
            labels = list(ids)
        else:
            raise ValueError(
                f"record {i} has keys {sorted(rec)}; expected {text_field!r}, 'input_ids', or 'prompt' + 'completion'"
            )
        if add_eos and eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
            labels = labels + [eos]
        out.append((ids, labels))
    return out


class TokenBlocks(TorchDataset):
    """Fixed-length blocks: ``input_ids``, ``labels`` and ``attention_mask`` (LongTensors)."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor):
        self.input_ids, self.labels, self.attention_mask = input_ids, labels, attention_mask

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "attention_mask": self.attention_mask[i]}

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


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
) -> TokenBlocks:
    """Load, tokenize and pack ``source`` into :class:`TokenBlocks` of ``seq_len`` tokens."""
    if isinstance(source, TokenBlocks):
        return source
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    records = load_records(source, split=split, text_field=text_field)
    if len(records) == 0:
        raise ValueError("the dataset is empty: no records to train or evaluate on")
    pairs = tokenize_records(records, tokenizer, text_field=text_field, mask_prompt=mask_prompt)
    pairs = [(ids, lab) for ids, lab in pairs if ids]
    if not pairs:
        raise ValueError("the dataset is empty after tokenization (every record has zero tokens)")
    rows: list[tuple[list[int], list[int]]] = []
    if packing:
        ids_all = [t for ids, _ in pairs for t in ids]
        lab_all = [t for _, lab in pairs for t in lab]
        for start in range(0, len(ids_all), seq_len):
            rows.append((ids_all[start : start + seq_len], lab_all[start : start + seq_len]))
    else:
        rows = [(ids[:seq_len], lab[:seq_len]) for ids, lab in pairs]
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad_token_id, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        k = len(ids)
        input_ids[r, :k] = torch.tensor(ids)
        labels[r, :k] = torch.tensor(lab)
        mask[r, :k] = 1
    if int((labels != IGNORE).sum()) == 0:
        raise ValueError("the dataset has no tokens to learn from (every label is masked)")
    return TokenBlocks(input_ids, labels, mask)


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
