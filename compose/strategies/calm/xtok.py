"""Cross-tokenizer CALM: an augmenting model that reads the text with its own tokenizer.

The composition is fed the anchor's token ids (training data, ``generate``). For an augmenting
model with another vocabulary, :class:`CrossTokenizer` turns those ids back into text with
the anchor tokenizer, tokenizes the text with the augmenting tokenizer, and says which
augmenting tokens each anchor token may read (``compose.align``: causal in characters, and only
tokens that no continuation of the text can change).

* **Text**: ``decode(anchor_ids)`` with special tokens skipped (a trailing incomplete UTF-8
  character, from byte-level tokens, is left out until it is complete), so the text only grows
  as tokens are appended.
* **Anchor ends**: anchor token ``t`` ends where the text of ``anchor_ids[: t + 1]`` ends
  (running maximum); a special token ends where the text before it ends.
* **Augmenting tokens**: ``encode(augment_tokenizer, text)`` with its leading special tokens
  (a BOS) but without trailing ones (an EOS would move as the text grows).
* **Visibility**: anchor token ``t`` sees the augmenting tokens that end at or before the
  stable end of ``text[: end(t)]`` (:func:`compose.align.visible_counts`).

In generation each row keeps its own augmenting cache: after new anchor tokens the augmenting
text is re-tokenised, the longest common prefix of old and new augmenting ids is kept (their
states depend on those ids only), the rest of the cache and of the projected keys/values is
dropped and recomputed. So cached decoding computes what a full forward over the same ids does.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from ...align import Boundaries, encode, require_fast
from ...data.padding import pad_id_of

__all__ = ["CrossTokenizer", "RowState", "check_text_data", "vocab_fingerprint", "same_vocabulary", "check_round_trip"]

#: Texts the anchor tokenizer must reproduce exactly (characters it does not know are left out).
_PROBES = (
    'Hello World, it\'s 12+3 = 15.\n  x_y (z) [a]: {b} "q" #tag',
    "def f(x):\n    return x * 2  # done\n\ttab",
    " leading space and trailing space ",
    "caf\u00e9 na\u00efve \u2192 \u4e2d\u6587",
)


def vocab_fingerprint(tokenizer: Any) -> str:
    """sha256 (32 hex digits) of a tokenizer's vocabulary (token -> id), special tokens included."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:32]


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers map the same tokens to the same ids."""
    return a is b or a.get_vocab() == b.get_vocab()


def _known_chars(tokenizer: Any, text: str) -> str:
    """``text`` without the characters ``tokenizer`` maps to its unknown token."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return text
    backend = tokenizer.backend_tokenizer
    return "".join(c for c in text if unk not in backend.encode(c, add_special_tokens=False).ids)


def check_round_trip(tokenizer: Any, name: str = "tokenizer") -> None:
    """``ValueError`` unless decoding the tokenizer's ids gives back the text it encoded.

    Cross-tokenizer CALM rebuilds the text from the anchor's ids; a tokenizer that normalises
    lossily (lower-casing, accent stripping, whitespace collapsing) would hand the augmenting
    model a different text than the one the data holds.
    """
    require_fast(tokenizer, name)
    backend = tokenizer.backend_tokenizer
    for probe in _PROBES:
        text = _known_chars(tokenizer, probe)
        ids = backend.encode(text, add_special_tokens=True).ids
        back = backend.decode(ids, skip_special_tokens=True)
        if back != text:
            at = next((i for i, (x, y) in enumerate(zip(text, back)) if x != y), min(len(text), len(back)))
            raise ValueError(
                f"{name} ({type(tokenizer).__name__}) does not round-trip text: decode(encode({text!r})) gives "
                f"{back!r} (first difference at character {at}). Cross-tokenizer CALM rebuilds the text from the "
                "anchor's token ids, so the anchor tokenizer must decode exactly what it encoded (no lossy "
                "normalisation such as lower-casing or whitespace clean-up)"
            )


class CrossTokenizer:
    """Alignment of one augmenting model's tokenization to the anchor's (see the module docstring).

    Args:
        anchor_tokenizer: the anchor's fast tokenizer (the one the ids come from).
        augment_tokenizer: the augmenting model's fast tokenizer.
        index: the augmenting model's index (for messages).
    """

    def __init__(self, anchor_tokenizer: Any, augment_tokenizer: Any, index: int = 0):
        self.name = f"augment_tokenizer (augmenting model {index})"
        require_fast(anchor_tokenizer, "tokenizer (the anchor's)")
        require_fast(augment_tokenizer, self.name)
        check_round_trip(anchor_tokenizer, "tokenizer (the anchor's)")
        self.anchor_tokenizer = anchor_tokenizer
        self.augment_tokenizer = augment_tokenizer
        self.boundaries = Boundaries(augment_tokenizer, self.name)
        self._decoder = anchor_tokenizer.backend_tokenizer
        #: special tokens the augmenting tokenizer puts before a text (a BOS): kept; the ones after it are not
        self.leading = _leading(encode(augment_tokenizer, "a", name=self.name).special)
        self.pad_id = pad_id_of(augment_tokenizer)

    # ------------------------------------------------------------------ anchor side
    def text(self, anchor_ids: list[int]) -> str:
        """The text of the anchor ids (special tokens skipped, an incomplete last character left out)."""
        return self._decoder.decode(anchor_ids, skip_special_tokens=True).rstrip("\ufffd")

    def anchor_ends(self, anchor_ids: list[int], text: str, start: int = 0, previous: int = 0) -> list[int]:
        """End (in ``text``) of anchor tokens ``start..``: where the text of ``anchor_ids[: t + 1]`` ends."""
        if start >= len(anchor_ids):
            return []
        prefixes = self._decoder.decode_batch(
            [anchor_ids[: t + 1] for t in range(start, len(anchor_ids))], skip_special_tokens=True
        )
        out = []
        for piece in prefixes:
            piece = piece.rstrip("\ufffd")
            if text.startswith(piece):
                end = len(piece)
            else:  # a decoder whose prefixes are not prefixes of the whole: the common part only
                end = next((i for i, (x, y) in enumerate(zip(piece, text)) if x != y), min(len(piece), len(text)))
            previous = max(previous, end)
            out.append(previous)
        return out

    # ------------------------------------------------------------------ augmenting side
    def augment_tokens(self, text: str) -> tuple[list[int], list[int]]:
        """Augmenting ids of ``text`` and their ends, leading special tokens kept, trailing ones dropped."""
        enc = encode(self.augment_tokenizer, text, add_special_tokens=True, name=self.name)
        n = len(enc)
        while n > self.leading and enc.special[n - 1]:
            n -= 1
        return enc.input_ids[:n], enc.ends[:n]

    def counts(self, text: str, anchor_ends: list[int], augment_ends: list[int]) -> list[int]:
        """How many leading augmenting tokens each anchor token (given by its end) may see."""
        limits = self.boundaries.stable_ends(text, anchor_ends)
        return [bisect_right(augment_ends, b) for b in limits]

    def align(self, anchor_ids: list[int]) -> tuple[list[int], list[int]]:
        """Full alignment of one row: ``(augment_ids, counts per anchor token)``."""
        text = self.text(anchor_ids)
        ends = self.anchor_ends(anchor_ids, text)
        aug_ids, aug_ends = self.augment_tokens(text)
        return aug_ids, self.counts(text, ends, aug_ends)


def _leading(special: list[bool]) -> int:
    return next((i for i, s in enumerate(special) if not s), len(special))


@dataclass
class RowState:
    """One row's augmenting side during cached decoding."""

    anchor_ids: list[int] = field(default_factory=list)
    anchor_end: int = 0
    augment_ids: list[int] = field(default_factory=list)
    cache: DynamicCache | None = None
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # per connection, [1, heads, S, head_dim]
    values: dict[int, torch.Tensor] = field(default_factory=dict)

    def crop(self, keep: int) -> None:
        """Drop everything after the first ``keep`` augmenting tokens (cache and projected keys/values)."""
        drop = len(self.augment_ids) - keep
        if drop <= 0:
            return
        try:
            if self.cache is not None:
                self.cache.crop(-drop)
        except (RuntimeError, ValueError):
            # a sliding-window layer past its window cannot be rolled back: recompute the row
            self.cache = None
            self.keys, self.values = {}, {}
            self.augment_ids = []
            return
        self.keys = {c: k[:, :, :keep] for c, k in self.keys.items()}
        self.values = {c: v[:, :, :keep] for c, v in self.values.items()}
        self.augment_ids = self.augment_ids[:keep]

    def clone(self) -> RowState:
        return copy.deepcopy(self)


def _token_id_error(name: str, what: str) -> ValueError:
    return ValueError(
        f"{name} gives {what}, but an augmenting model of this composition has its own tokenizer: it must read the "
        "text, and token ids cannot be re-tokenised with its tokenizer. Give the data as text (strings, or records "
        'with "text" or "prompt"/"completion")'
    )


def check_text_data(data: Any, name: str) -> None:
    """``ValueError`` when training data for a cross-tokenizer composition is token ids instead of text.

    Looks at what can be seen without reading the data: tensors, token blocks, a list of
    records, a ``datasets.Dataset``'s columns and the first record of a local ``.jsonl``/``.json``.
    """
    if data is None:
        return
    if isinstance(data, torch.Tensor) or isinstance(getattr(data, "input_ids", None), torch.Tensor):
        raise _token_id_error(name, "token ids (a tensor or token blocks)")
    if isinstance(data, dict) and "train" in data and hasattr(data["train"], "column_names"):
        data = data["train"]
    columns = getattr(data, "column_names", None)
    if isinstance(columns, list) and "input_ids" in columns and not {"text", "prompt"} & set(columns):
        raise _token_id_error(name, "a dataset with an input_ids column and no text")
    records: list[Any] = []
    if isinstance(data, (list, tuple)):
        records = list(data)
    elif isinstance(data, (str, os.PathLike)):
        path = Path(data).expanduser()
        if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                if path.suffix.lower() == ".jsonl":
                    first = next((line for line in f if line.strip()), None)
                    records = [json.loads(first)] if first else []
                else:
                    loaded = json.load(f)
                    records = loaded if isinstance(loaded, list) else [loaded]
    for i, record in enumerate(records):
        if isinstance(record, dict) and "input_ids" in record and not {"text", "prompt"} & set(record):
            raise _token_id_error(f"{name}[{i}]", "input_ids records")
