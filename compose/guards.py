"""Checks that turn inputs which would quietly train or score the wrong thing into a clear error or warning.

Each runs before any work: on the models a ``Composer`` is built from (an encoder or an
encoder-decoder is not a causal LM), on weights (a NaN in a frozen tensor is named, not
blamed on the learning rate), on the text and tokenizer (characters that become ``<unk>``,
a tokenizer with no EOS to separate packed documents), and on the size of the data
(a batch larger than the dataset).
"""

from __future__ import annotations

import itertools
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .validation import OptionError

__all__ = [
    "check_causal_lm",
    "first_nonfinite",
    "check_finite_weights",
    "check_tokenizer_on_text",
    "check_text_records",
    "check_batch_fits",
    "check_eval_batch_size",
]

_SAMPLE_RECORDS = 64
_SAMPLE_BYTES = 1 << 16


def check_causal_lm(model: nn.Module, role: str = "anchor") -> None:
    """An encoder (BERT-like) or an encoder-decoder (T5-like) model is refused: it is not a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    config = getattr(model, "config", None)
    if config is None:
        return
    kind = getattr(config, "model_type", type(model).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"the {role} ({type(model).__name__}, model_type {kind!r}) is an encoder-decoder model: compose trains "
            "causal (decoder-only) language models; give a *ForCausalLM checkpoint"
        )
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise ValueError(
            f"the {role} ({type(model).__name__}, model_type {kind!r}) is an encoder: every token sees the tokens "
            "after it, so it would not learn (or score) next-token prediction. Give a decoder-only causal LM"
        )


def first_nonfinite(model: nn.Module, *, trainable: bool | None = None) -> str | None:
    """The name of the first parameter holding NaN/inf (``trainable``: only those, or only frozen ones)."""
    for name, p in model.named_parameters():
        if trainable is not None and p.requires_grad != trainable:
            continue
        if p.is_floating_point() and not p.is_meta and not bool(torch.isfinite(p.detach()).all()):
            return name
    return None


def check_not_meta(model: nn.Module, action: str) -> None:
    """A model built on the ``meta`` device has shapes but no values: name a tensor and what to do."""
    meta = next((n for n, p in itertools.chain(model.named_parameters(), model.named_buffers()) if p.is_meta), None)
    if meta is not None:
        raise ValueError(
            f"cannot {action}: the model's weights are on the meta device (shapes without values, e.g. {meta}); "
            "load real weights first (from_pretrained, or to_empty() then load_state_dict) before composing"
        )


def check_finite_weights(model: nn.Module, action: str, *, trainable: bool | None = None) -> None:
    """Refuse to ``action`` (train, generate, evaluate) a model whose weights hold NaN/inf, naming the tensor.

    ``trainable=False`` looks at the frozen weights only (``fit``: a non-finite trainable weight is
    caught by the loop's own guard, naming the step).
    """
    check_not_meta(model, action)
    bad = first_nonfinite(model, trainable=trainable)
    if bad is not None:
        frozen = not dict(model.named_parameters())[bad].requires_grad
        kind = "frozen (anchor or augmenting) weight" if frozen else "trainable weight"
        raise ValueError(
            f"cannot {action}: the {kind} {bad} holds NaN or inf, so every output would be garbage; the "
            "checkpoint it was loaded from is damaged: reload the model from a good copy"
        )


# ---------------------------------------------------------------------------- text and tokenizer
def _file_texts(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8", errors="replace") as f:
        if suffix == ".txt":
            return [p for p in f.read(_SAMPLE_BYTES).split("\n\n") if p.strip()]
        if suffix != ".jsonl":
            return []
        texts = []
        for _ in range(_SAMPLE_RECORDS):
            line = f.readline(_SAMPLE_BYTES)
            if not line:
                break
            try:
                record = json.loads(line)
            except ValueError:  # a longer line, or not JSON: the reader names that
                continue
            if isinstance(record, dict) and isinstance(record.get(text_field), str):
                texts.append(record[text_field])
        return texts


def _record_texts(record: Any, text_field: str) -> list[str]:
    if isinstance(record, str):
        return [record]
    if isinstance(record, dict):
        return [v for k in (text_field, "prompt", "completion") if isinstance(v := record.get(k), str)]
    return []


def text_samples(data: Any, text_field: str = "text") -> list[str]:
    """Up to the first :data:`_SAMPLE_RECORDS` texts of ``data`` (cheap: a file's first 64 KB)."""
    import datasets

    if isinstance(data, (str, os.PathLike)):
        path = Path(data).expanduser()
        return _file_texts(path, text_field) if path.is_file() else []
    if isinstance(data, (list, tuple)):
        return [t for r in data[:_SAMPLE_RECORDS] for t in _record_texts(r, text_field)]
    if isinstance(data, datasets.Dataset):
        rows = data.select(range(min(len(data), _SAMPLE_RECORDS))).to_list()
        return [t for r in rows for t in _record_texts(r, text_field)]
    return []


def _unk_characters(tokenizer: Any, text: str, unk: int) -> list[str]:
    found = []
    for ch in dict.fromkeys(text[:4000]):
        if not ch.isspace() and unk in tokenizer(ch, add_special_tokens=False)["input_ids"]:
            found.append(ch)
    return found


def check_tokenizer_on_text(tokenizer: Any, data: Any, name: str, *, packing: bool, text_field: str = "text") -> None:
    """No EOS with packing is an error; characters that become ``<unk>`` are a warning naming them."""
    texts = text_samples(data, text_field) if tokenizer is not None else []
    if not texts:
        return
    if packing and getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError(
            f"{name} is text and the tokenizer has no EOS token, so packing would join documents with no "
            "separator between them: give the tokenizer one (tokenizer.eos_token = one of its tokens) or pass "
            "packing=False"
        )
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    hits = [(i, row.count(unk)) for i, row in enumerate(ids) if unk in row]
    if not hits:
        return
    chars = list(dict.fromkeys(c for i, _ in hits[:8] for c in _unk_characters(tokenizer, texts[i], unk)))
    total, count = sum(map(len, ids)), sum(n for _, n in hits)
    shown = " ".join(repr(c) for c in chars[:10]) or "(combinations of characters)"
    warnings.warn(
        f"compose: {count} of {total} tokens in the first {len(texts)} texts of {name} are the tokenizer's "
        f"<unk>: it does not cover {shown}; the model will learn <unk> for them. Use a tokenizer that covers "
        "this text, or clean the data",
        stacklevel=4,
    )


def check_text_records(data: Any, name: str, text_field: str = "text") -> None:
    """In a list of records, the text fields must hold strings (``{"text": 123}`` names the record)."""
    if not isinstance(data, (list, tuple)):
        return
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            continue
        for key in dict.fromkeys((text_field, "prompt", "completion")):
            value = record.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name}[{i}]: {key!r} is {value!r:.40} ({type(value).__name__}); expected a string")


# ---------------------------------------------------------------------------- sizes
def check_batch_fits(num_blocks: int, batch_size: int, world: int, seq_len: int) -> None:
    """A micro-batch larger than the whole dataset repeats blocks within the batch: say so."""
    wanted = batch_size * world
    if num_blocks < wanted:
        warnings.warn(
            f"compose: the training data packs into {num_blocks} block(s) of seq_len={seq_len} tokens, fewer than "
            f"one batch (batch_size={batch_size} x {world} process(es)): each batch repeats blocks. Lower "
            "batch_size or seq_len, or give more data",
            stacklevel=4,
        )


def check_eval_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise OptionError(f"batch_size={batch_size!r} is not accepted; expected an integer >= 1")
    return batch_size
