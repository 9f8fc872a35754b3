"""Checks of what a run reads: data files (UTF-8, JSON records) and token ids against the vocabulary.

Each check fails now, naming the file, line or row, rather than at some training step.
"""

from __future__ import annotations

from typing import Any

from .rules import OptionError

__all__ = ["check_data_file", "check_token_ids", "check_tokenizer_vocabulary", "vocab_size"]


# ---------------------------------------------------------------------------- token ids
def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def vocab_size(model: Any) -> int | None:
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except Exception:  # noqa: BLE001 - a composite without input embeddings: use the config
        size = getattr(getattr(model, "config", None), "vocab_size", None)
        return size if isinstance(size, int) else None


def check_tokenizer_vocabulary(tokenizer: Any, model: Any) -> None:
    """A tokenizer that can produce ids the model has no embedding for is an error now, not at step 1."""
    if tokenizer is None or not hasattr(tokenizer, "__len__"):
        return
    vocab = vocab_size(model)
    if vocab is not None and len(tokenizer) > vocab:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has {len(tokenizer)} tokens but the model's embedding has {vocab} rows: ids "
            f">= {vocab} would index past it. Use the tokenizer that belongs to the model (tokenizer=...), or "
            "resize the model's embeddings before composing"
        )


def check_token_ids(data: Any, vocab: int | None, name: str) -> None:
    """Token ids given directly (``input_ids`` records, token blocks) must lie in ``[0, vocab)``."""
    if vocab is None or data is None:
        return
    tensor = data if _is_tensor(data) else getattr(data, "input_ids", None)
    if _is_tensor(data):
        items: list[tuple[str, Any]] = [(name, data)]
    elif _is_tensor(tensor):
        items = [(f"{name}.input_ids", tensor)]
    elif isinstance(data, (list, tuple)) and data and all(isinstance(r, dict) for r in data):
        items = [(f"{name}[{i}]", r.get("input_ids")) for i, r in enumerate(data)]
    else:
        return
    for where, ids in items:
        if ids is None:
            continue
        t = ids if _is_tensor(ids) else None
        if t is None:
            if not isinstance(ids, (list, tuple)) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in ids
            ):
                raise OptionError(f"{where}: input_ids must be a list of integer token ids, got {str(ids)[:60]}")
            if not ids:
                continue
            low, high = min(ids), max(ids)
        elif t.numel() == 0:
            continue
        else:
            low, high = int(t.min()), int(t.max())
        if low < 0 or high >= vocab:
            bad = high if high >= vocab else low
            raise OptionError(
                f"{where}: token id {bad} is outside the model's vocabulary (valid ids: 0..{vocab - 1}); "
                "were these ids made with another tokenizer?"
            )


# ---------------------------------------------------------------------------- data files
def check_data_file(path: Any, text_field: str = "text") -> None:
    """A local .txt/.jsonl/.json data file must be UTF-8 and hold some text (and .jsonl one JSON object per
    line, its ``text_field`` a string).

    Read as a stream, so the check costs one pass over the file and no memory; the error
    names the file, the byte offset and the line.
    """
    import codecs
    import json
    import os
    from pathlib import Path

    if not isinstance(path, (str, os.PathLike)):
        return
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json") or not p.is_file():
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, content = 0, False
    if suffix == ".txt":  # read in blocks: one line may be a whole (huge) document
        return _check_text_file(p, decoder)
    with open(p, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = decoder.decode(raw)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{p}: not UTF-8 text at byte {offset + e.start} (line {number}); re-save the file as UTF-8"
                ) from None
            content = content or bool(text.strip())
            if suffix == ".jsonl" and text.strip():
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{number}: not a JSON record ({e.msg} at column {e.colno})") from None
                _check_json_record(p, number, record, text_field)
            offset += len(raw)
    if not content:
        raise ValueError(f"{p} is empty: it holds no text to train or evaluate on")


def _check_text_file(p: Any, decoder: Any) -> None:
    offset, lines, content = 0, 1, False
    with open(p, "rb") as f:
        while raw := f.read(1 << 20):
            try:
                text = decoder.decode(raw)
            except UnicodeDecodeError as e:
                line = lines + raw[: e.start].count(b"\n")
                raise ValueError(
                    f"{p}: not UTF-8 text at byte {offset + e.start} (line {line}); re-save the file as UTF-8"
                ) from None
            content = content or bool(text.strip())
            offset, lines = offset + len(raw), lines + raw.count(b"\n")
    if not content:
        raise ValueError(f"{p} is empty: it holds no text to train or evaluate on")


def _check_json_record(path: Any, number: int, record: Any, text_field: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(
            f"{path}:{number}: a JSON {type(record).__name__}, not a record; each line must be an object such as "
            '{"text": "..."} or {"input_ids": [...]}'
        )
    value = record.get(text_field)
    if value is not None and not isinstance(value, str):
        raise ValueError(
            f"{path}:{number}: {text_field!r} is {value!r:.40} ({type(value).__name__}); expected a string"
        )
