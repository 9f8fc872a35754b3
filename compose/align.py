"""Character alignment of two tokenizations of one text (cross-tokenizer composition).

When the anchor and an augmenting model tokenize differently, anchor token ``t`` may
look at augmenting token ``s`` only if everything ``s``'s state depends on is text that
``t`` has already seen, and only if no continuation of that text could change ``s``.
This module computes that visibility as pure functions of the tokenizers and the text:

* a token's **end** is the end of its character span, taken as a running maximum over
  the sequence, so a special token counts as ending where the text before it ends
  (``<s>`` at 0, a closing ``</s>`` at the end of the text);
* a **stable end** of a prefix ``P`` is the character position up to which the augmenting
  tokens of ``P`` are final: tokenizers never merge across a pre-token boundary, but
  the last pre-token of ``P`` may still grow or merge with what follows (``"hel"`` +
  ``"lo"``; ``" "`` + ``" x"`` under GPT-2's whitespace rule), so its start is the
  stable end. When every pre-token is one character, nothing can merge and the stable
  end is ``len(P)``;
* anchor token ``t`` (ending at ``e``) sees augmenting token ``s`` iff ``s`` ends at or
  before the stable end of ``text[:e]``. Visibility is a prefix of the augmenting
  tokens, so it is returned as one count per anchor token.

The same stable end gives the **unstable tail** for incremental decoding: when text is
appended, the augmenting tokens after the stable end are re-tokenised (and their cache
entries dropped); the ones before it never change.

Limits: the tokenizers must be fast (``PreTrainedTokenizerFast``: character offsets). A
tokenizer whose pre-tokenizer does not split the text (SentencePiece-style
``Metaspace(split=False)``) is handled when no vocabulary entry holds the word marker
after its first character (then words are boundaries); otherwise, or with no
pre-tokenizer at all, any appended text may change any token and this module refuses it.

>>> from compose.align import encode, visible_counts
>>> from compose.testing import tiny_tokenizer
>>> chars = tiny_tokenizer()
>>> a = encode(chars, "ab c")
>>> a.input_ids[:1], a.ends
([1], [0, 1, 2, 3, 4])
>>> visible_counts(a, a, chars)
[1, 2, 3, 4, 5]
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch

__all__ = [
    "Encoded",
    "encode",
    "require_fast",
    "Boundaries",
    "visible_counts",
    "visibility_mask",
    "unstable_tail",
    "Incremental",
]

_PROBE = "ab cd1 23\n(e,f)  g.h'i"


def require_fast(tokenizer: Any, name: str = "augment_tokenizer") -> None:
    """A ``ValueError`` naming ``name`` unless ``tokenizer`` is a fast tokenizer (it gives character offsets)."""
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(
            f"{name} is a {type(tokenizer).__name__}, a slow tokenizer without character offsets; aligning "
            "two tokenizations needs a fast one: load it with AutoTokenizer.from_pretrained(..., use_fast=True) "
            "(a PreTrainedTokenizerFast)"
        )


@dataclass(frozen=True)
class Encoded:
    """One text tokenized with character offsets.

    Attributes:
        text: the text.
        input_ids: token ids, special tokens included.
        spans: ``(start, end)`` character span of each token in ``text`` (``(0, 0)`` for
            special tokens, as transformers reports them).
        ends: running maximum of the span ends: the state of token ``i`` depends on
            ``text[:ends[i]]`` only.
        special: whether each token is a special token.
    """

    text: str
    input_ids: list[int]
    spans: list[tuple[int, int]]
    ends: list[int]
    special: list[bool]

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(tokenizer: Any, text: str, *, add_special_tokens: bool = True, name: str = "tokenizer") -> Encoded:
    """Tokenize ``text`` with character offsets (no truncation, no padding)."""
    require_fast(tokenizer, name)
    if not isinstance(text, str):
        raise TypeError(f"aligning tokenizations needs text (a str), got {type(text).__name__}")
    out = tokenizer(
        text,
        add_special_tokens=add_special_tokens,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        truncation=False,
    )
    spans = [(int(a), int(b)) for a, b in out["offset_mapping"]]
    special = [bool(m) for m in out["special_tokens_mask"]]
    ends = list(accumulate((0 if sp else b for (_, b), sp in zip(spans, special)), max, initial=0))[1:]
    return Encoded(text, list(out["input_ids"]), spans, ends, special)


class Boundaries:
    """Where a tokenizer's tokens of a prefix become final (see the module docstring).

    ``stable_end(text)`` is the start of the last pre-token of ``text`` (or ``len(text)``
    when every pre-token is a single character).
    """

    def __init__(self, tokenizer: Any, name: str = "augment_tokenizer"):
        require_fast(tokenizer, name)
        from tokenizers import pre_tokenizers

        backend = tokenizer.backend_tokenizer
        self.normalizer = backend.normalizer
        self.pre_tokenizer = backend.pre_tokenizer
        spec = json.loads(backend.to_str()).get("pre_tokenizer")
        if self.pre_tokenizer is None:
            raise ValueError(
                f"{name} ({type(tokenizer).__name__}) has no pre-tokenizer, so appending text may change any of "
                "its tokens: character alignment needs a tokenizer that splits text into pre-tokens (words, "
                "bytes or characters)"
            )
        if spec and spec.get("type") == "Metaspace" and not spec.get("split", True):
            marker = spec.get("replacement", "\u2581")
            inner = [tok for tok in tokenizer.get_vocab() if marker in tok[1:]]
            if inner:
                raise ValueError(
                    f"{name} ({type(tokenizer).__name__}) does not split on words and its vocabulary holds tokens "
                    f"with the word marker inside ({inner[:3]}), so appending text may change any token: it "
                    "cannot be aligned by characters"
                )
            # No token crosses a word marker, so words are boundaries as if the text were split there.
            self.pre_tokenizer = pre_tokenizers.Metaspace(
                replacement=marker, prepend_scheme=spec.get("prepend_scheme", "always"), split=True
            )
        self.per_char = all(b - a == 1 for a, b in self.pieces(_PROBE))

    def pieces(self, text: str) -> list[tuple[int, int]]:
        """Character spans (in ``text``) of the pre-tokens of ``text``."""
        from tokenizers import PreTokenizedString

        pts = PreTokenizedString(text)
        if self.normalizer is not None:
            pts.normalize(lambda normalized: self.normalizer.normalize(normalized))
        self.pre_tokenizer.pre_tokenize(pts)
        return [(int(a), int(b)) for _, (a, b), _ in pts.get_splits(offset_referential="original", offset_type="char")]

    def stable_end(self, text: str) -> int:
        """Characters of ``text`` whose tokens no continuation can change."""
        if self.per_char:
            return len(text)
        pieces = [p for p in self.pieces(text) if p[1] > p[0]]
        return pieces[-1][0] if pieces else 0

    def stable_ends(self, text: str, cuts: Sequence[int]) -> list[int]:
        """``stable_end(text[:c])`` for every ``c`` in ``cuts``, pre-tokenizing a short window per cut.

        A cut's window starts a few pre-tokens of the whole text back; it is widened until the
        prefix's last pre-token starts inside it, so the answer equals ``stable_end(text[:c])``.
        """
        if self.per_char:
            return [int(c) for c in cuts]
        starts = [a for a, b in self.pieces(text) if b > a]
        out = []
        for c in cuts:
            c = int(c)
            k = bisect_right(starts, c - 1) - 1  # the whole text's pre-token holding character c - 1
            back = 2
            while True:
                w = starts[max(0, k - back)] if k >= 0 else 0
                local = [p for p in self.pieces(text[w:c]) if p[1] > p[0]]
                first = local[-1][0] if local else 0
                if first > 0 or w == 0:
                    out.append(w + first)
                    break
                back *= 2
        return out


def visible_counts(
    anchor: Encoded, augment: Encoded, augment_tokenizer: Any, *, boundaries: Boundaries | None = None
) -> list[int]:
    """For each anchor token, how many leading augmenting tokens it may see.

    Anchor token ``t`` ending at ``e`` sees augmenting token ``s`` iff ``augment.ends[s]``
    is at most the stable end of ``text[:e]``. Both encodings must be of the same text.
    """
    if anchor.text != augment.text:
        raise ValueError("the anchor and augmenting encodings are of different texts; encode one text with both")
    bounds = boundaries or Boundaries(augment_tokenizer)
    limits = bounds.stable_ends(augment.text, anchor.ends)
    return [bisect_right(augment.ends, b) for b in limits]


def visibility_mask(
    counts: Sequence[Sequence[int]],
    anchor_len: int,
    augment_len: int,
    *,
    anchor_left_pad: Sequence[int] | None = None,
    augment_left_pad: Sequence[int] | None = None,
) -> torch.Tensor:
    """``[batch, anchor_len, augment_len]`` booleans from per-row counts, padding never visible.

    Row ``b`` has ``len(counts[b])`` anchor tokens and its own number of augmenting tokens
    (``max(counts[b])`` at least); with left padding, ``*_left_pad[b]`` pad positions come
    first. Padded anchor rows see nothing; a real anchor token may also see nothing (a
    leading ``<s>`` when the augmenting tokenizer adds none): consumers must give such
    rows a zero output rather than a softmax over no keys.
    """
    batch = len(counts)
    mask = torch.zeros(batch, anchor_len, augment_len, dtype=torch.bool)
    cols = torch.arange(augment_len)
    for b, row in enumerate(counts):
        pa = anchor_left_pad[b] if anchor_left_pad is not None else 0
        pb = augment_left_pad[b] if augment_left_pad is not None else 0
        if pa + len(row) > anchor_len:
            raise ValueError(f"row {b}: {pa} pad + {len(row)} anchor tokens exceed anchor_len={anchor_len}")
        if row and pb + max(row) > augment_len:
            raise ValueError(
                f"row {b}: {pb} pad + {max(row)} visible augmenting tokens exceed augment_len={augment_len}"
            )
        n = torch.as_tensor(list(row), dtype=torch.long)
        mask[b, pa : pa + len(row)] = (cols >= pb) & (cols < pb + n[:, None])
    return mask


def _stable_count(enc: Encoded, bound: int) -> int:
    # Trailing special tokens (a closing ``</s>``) move when text is appended: never stable.
    last_text = len(enc) - next((i for i, sp in enumerate(reversed(enc.special)) if not sp), len(enc))
    return min(bisect_right(enc.ends, bound), last_text)


def unstable_tail(
    tokenizer: Any, text: str, *, add_special_tokens: bool = True, boundaries: Boundaries | None = None
) -> int:
    """How many trailing tokens of ``encode(tokenizer, text)`` appending text may change."""
    enc = encode(tokenizer, text, add_special_tokens=add_special_tokens)
    return len(enc) - _stable_count(enc, (boundaries or Boundaries(tokenizer)).stable_end(text))


class Incremental:
    """The augmenting model's side of decoding: text grows, tokens before the stable end stay.

    ``extend(more)`` returns ``(keep, ids)``: the first ``keep`` tokens (and their cache
    entries) are unchanged, ``ids`` are the tokens from position ``keep`` on, to be run
    through the augmenting model. ``encoded`` is always the tokenization of the whole text,
    so decoding sees exactly what a full forward over the final text sees.
    """

    def __init__(self, tokenizer: Any, text: str = "", *, add_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.boundaries = Boundaries(tokenizer)
        self.add_special_tokens = add_special_tokens
        self.encoded = encode(tokenizer, text, add_special_tokens=add_special_tokens)

    def stable_count(self) -> int:
        """Leading tokens that no continuation of the current text can change."""
        return _stable_count(self.encoded, self.boundaries.stable_end(self.encoded.text))

    def extend(self, more: str) -> tuple[int, list[int]]:
        old = self.encoded
        stable = self.stable_count()
        new = encode(self.tokenizer, old.text + more, add_special_tokens=self.add_special_tokens)
        keep = 0
        limit = min(len(old), len(new))
        while keep < limit and old.input_ids[keep] == new.input_ids[keep] and old.spans[keep] == new.spans[keep]:
            keep += 1
        if keep < stable:
            raise RuntimeError(
                f"tokens {keep}..{stable - 1} of the text changed although they were final; the tokenizer "
                "breaks the pre-token rule this alignment relies on"
            )
        self.encoded = new
        return keep, new.input_ids[keep:]
