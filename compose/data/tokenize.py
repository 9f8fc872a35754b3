"""Records -> token ids and labels: plain text, ``input_ids``, prompt + completion, chat ``messages``."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from ..longdoc import CONTINUES, PIECE, encode_bounded
from .columns import IGNORE, _list_array


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
        from ..chat import encode_chats, resolve_template

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
