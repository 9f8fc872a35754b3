"""Cross-tokenizer composition: the part of ``CalmForCausalLM`` that reads text with the augment's own tokenizer.

:class:`CrossTokenizerMixin` reconstructs each row's text from the anchor ids, runs the
augmenting model on its own tokenization of it, and builds the character-aligned visibility
(:mod:`compose.align`); with a cache, each row keeps its augmenting prefix and re-runs only
the re-tokenised tail. ``docs/calm.md`` says why and where the limits are.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ... import arch, packing
from ...data.padding import pad_batch
from .xtok import CrossTokenizer, vocab_fingerprint

__all__ = ["CrossTokenizerMixin"]


class CrossTokenizerMixin:
    """Alignment and augmenting-model runs for the augmenting models that have their own tokenizer."""

    def _set_tokenizers(self, tokenizer: Any, augment_tokenizers: list[Any] | None) -> None:
        """Check the tokenizers against ``config.cross_tokenizers`` and build each augmenting model's alignment."""
        records = list(self.config.cross_tokenizers or [])
        n = len(self.augments)
        if augment_tokenizers is not None and len(augment_tokenizers) != n:
            raise ValueError(f"augment_tokenizers has {len(augment_tokenizers)} entries for {n} augmenting model(s)")
        if len(records) < n:
            records += [None] * (n - len(records))
        for i, record in enumerate(records):
            if record is None:
                continue
            aug_tok = augment_tokenizers[i] if augment_tokenizers is not None else None
            if tokenizer is None or aug_tok is None:
                raise ValueError(
                    f"augmenting model {i} reads text with its own tokenizer ({record.get('name') or 'unnamed'}); "
                    "pass tokenizer= (the anchor's) and augment_tokenizers=[...] to CalmForCausalLM, or load the "
                    "composition from a directory written by save_pretrained (it holds both)"
                )
            for what, tok, key in (
                ("anchor tokenizer", tokenizer, "anchor_vocab"),
                (f"augment_tokenizer {i}", aug_tok, "vocab"),
            ):
                saved = record.get(key)
                if saved is not None and vocab_fingerprint(tok) != saved:
                    raise ValueError(
                        f"the {what} does not fit this composition: its vocabulary fingerprint is "
                        f"{vocab_fingerprint(tok)}, the composition was built with {saved}. Pass the tokenizer it "
                        "was trained with"
                    )
            self.cross[i] = CrossTokenizer(tokenizer, aug_tok, i)
            self.augment_tokenizers[i] = aug_tok

    @property
    def is_cross_tokenizer(self) -> bool:
        """Whether some augmenting model reads the text with its own tokenizer."""
        return any(x is not None for x in self.cross)

    @staticmethod
    def _real_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[list[int], list[int]]]:
        """Per row: the positions (in the new tokens) of the real tokens, and their ids."""
        q = input_ids.shape[1]
        out = []
        for b in range(input_ids.shape[0]):
            pos = attention_mask[b, -q:].nonzero().flatten().tolist()
            out.append((pos, input_ids[b, pos].tolist()))
        return out

    def _check_augment_length(self, i: int, length: int) -> None:
        limit = arch.max_positions(self.augments[i])
        if limit is not None and length > limit:
            raise ValueError(
                f"the text of this input is {length} tokens for augmenting model {i}, beyond its {limit} positions "
                "(max_position_embeddings): its tokenizer splits the text more finely than the anchor's. Use "
                "shorter inputs (a smaller seq_len)"
            )

    def _cross_full(self, i, conns, input_ids, attention_mask, keys, values) -> torch.Tensor:
        """No cache: align every row, run the augmenting model on its own tokens (right padded)."""
        xt = self.cross[i]
        rows = self._real_ids(input_ids, attention_mask)
        aligned = [xt.align(ids) for _, ids in rows]
        width = max(1, max(len(a) for a, _ in aligned))
        self._check_augment_length(i, width)
        device = input_ids.device
        # an empty row runs one (never visible) pad token
        aug_ids, aug_mask = pad_batch([ids or [xt.pad_id] for ids, _ in aligned], xt.pad_id)
        positions = torch.arange(width).expand(len(rows), -1)
        states = self._augment_states(i, aug_ids.to(device), aug_mask.to(device), positions.to(device), None)
        for c in conns:
            keys[c], values[c] = self.connections[c].keys_values(states[self.plan[c][1]])
        return self._visible_from_counts(
            input_ids.shape, width, [(pos, counts) for (pos, _), (_, counts) in zip(rows, aligned)], device
        )

    def _cross_documents(self, i, conns, input_ids, docs, keys, values) -> torch.Tensor:
        """Packed documents (no cache): each document aligned alone; an anchor token sees only its document's part."""
        xt, device = self.cross[i], input_ids.device
        rows = []  # per row: augmenting ids, their positions (restarting per document), [lo, hi) seen per query
        for ids, row_docs in zip(input_ids.tolist(), docs.tolist()):
            aug, pos, spans, start = [], [], [], 0
            while start < len(ids):
                end = start + 1
                while end < len(ids) and row_docs[end] == row_docs[start]:
                    end += 1
                doc_ids, counts = xt.align(ids[start:end])
                self._check_augment_length(i, len(doc_ids))
                spans += [(len(aug), len(aug) + c) for c in counts]
                aug, pos, start = aug + doc_ids, pos + list(range(len(doc_ids))), end
            rows.append((aug, pos, spans))
        aug_ids, _ = pad_batch([aug or [xt.pad_id] for aug, _, _ in rows], xt.pad_id)
        width = aug_ids.shape[1]
        # padding positions restart at 0: the padding is a document of its own, seen by no real token
        positions = torch.tensor([pos + list(range(width - len(pos))) for _, pos, _ in rows], device=device)
        lo, hi = torch.tensor([spans for _, _, spans in rows], dtype=torch.long).unbind(-1)
        aug_docs = packing.document_ids(positions)
        states = self._augment_states(i, aug_ids.to(device), None, positions, None, aug_docs)
        for c in conns:
            keys[c], values[c] = self.connections[c].keys_values(states[self.plan[c][1]])
        cols = torch.arange(width)[None, None, :]
        return ((cols >= lo[..., None]) & (cols < hi[..., None])).to(device)

    @staticmethod
    def _visible_from_counts(shape, width: int, rows, device) -> torch.Tensor:
        """``[batch, q, width]``: query ``pos[j]`` of row ``b`` sees the first ``counts[j]`` augmenting tokens."""
        visible = torch.zeros(shape[0], shape[1], width, dtype=torch.bool)
        cols = torch.arange(width)
        for b, (pos, counts) in enumerate(rows):
            if pos:
                visible[b, pos] = cols[None, :] < torch.tensor(counts, dtype=torch.long)[:, None]
        return visible.to(device)

    def _cross_cached(self, i, conns, input_ids, attention_mask, cache, keys, values) -> torch.Tensor:
        """With a cache: each row re-tokenises its grown text, keeps the unchanged augmenting prefix, runs the rest."""
        xt = self.cross[i]
        rows = self._real_ids(input_ids, attention_mask)
        states = cache.cross_rows(i, len(rows))
        device = input_ids.device
        base = self.augments[i]
        counts_per_row = []
        for (pos, new_ids), row in zip(rows, states):
            start = len(row.anchor_ids)
            row.anchor_ids.extend(new_ids)
            text = xt.text(row.anchor_ids)
            ends = xt.anchor_ends(row.anchor_ids, text, start, row.anchor_end)
            if ends:
                row.anchor_end = ends[-1]
            aug_ids, aug_ends = xt.augment_tokens(text)
            keep = 0
            limit = min(len(aug_ids), len(row.augment_ids))
            while keep < limit and aug_ids[keep] == row.augment_ids[keep]:
                keep += 1
            row.crop(keep)
            keep = len(row.augment_ids)  # 0 when the row had to be recomputed
            fresh = aug_ids[keep:]
            self._check_augment_length(i, len(aug_ids))
            if fresh:
                if row.cache is None:
                    row.cache = DynamicCache(config=base.config)
                ids = torch.tensor([fresh], dtype=torch.long, device=device)
                mask = torch.ones(1, keep + len(fresh), dtype=torch.long, device=device)
                position = torch.arange(keep, keep + len(fresh), device=device)[None]
                captured = self._augment_states(i, ids, mask, position, row.cache)
                for c in conns:
                    k, v = self.connections[c].keys_values(captured[self.plan[c][1]])
                    if c in row.keys:
                        k, v = torch.cat([row.keys[c], k], dim=2), torch.cat([row.values[c], v], dim=2)
                    row.keys[c], row.values[c] = k, v
                row.augment_ids = list(aug_ids)
            counts_per_row.append((pos, xt.counts(text, ends, aug_ends)))
        width = max(1, max(len(r.augment_ids) for r in states))
        for c in conns:
            ks, vs = [], []
            for row in states:
                k, v = row.keys.get(c), row.values.get(c)
                if k is None:
                    shape = (1, self.connections[c].num_heads, 0, self.connections[c].head_dim)
                    dtype = self.connections[c].k.weight.dtype
                    k = v = torch.zeros(shape, dtype=dtype, device=device)
                pad = (0, 0, 0, width - k.shape[2])
                ks.append(F.pad(k, pad))
                vs.append(F.pad(v, pad))
            keys[c], values[c] = torch.cat(ks), torch.cat(vs)
        return self._visible_from_counts(input_ids.shape, width, counts_per_row, device)
