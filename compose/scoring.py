"""Per-document log-likelihood: the standard perplexity, bits per byte, word perplexity.

The measure the field reports (lm-evaluation-harness' ``loglikelihood_rolling``, the
``wikitext`` task, the LLaMA Pro and CALM papers' perplexities):

* every document is scored **on its own** - no packing with other documents, no cut inside a
  document shorter than the window;
* a longer document is scored in rolling windows of ``max_length`` tokens, each token once;
  ``context_len`` (default 1, as lm-eval) is the least context the first token of a later
  window gets; a larger value overlaps the windows (the strided evaluation of transformers'
  perplexity guide);
* the first token is predicted from the tokenizer's own document-start tokens (Gemma's
  ``<bos>``, Llama's ``<s>``); a tokenizer that adds none gets its BOS token, else its EOS
  token, exactly as lm-eval's ``prefix_token_id``;
* bits per byte (``-sum log p / ln 2 / UTF-8 bytes``) and word perplexity are comparable
  across tokenizers; token perplexity is not.

Pre-tokenized records (``input_ids``) are scored as given (their first token is context);
``prompt`` + ``completion`` records score the completion given the prompt.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .arch import max_positions
from .data.padding import pad_batch
from .longdoc import encode_bounded

__all__ = [
    "Document",
    "documents",
    "rolling_windows",
    "prefix_tokens",
    "score_documents",
    "LOGITS_BUDGET",
    "model_positions",
]

LOGITS_BUDGET = 2**30
"""Bytes of fp32 logits one forward may produce; batches shrink to stay under it (262k vocabularies)."""


@dataclass
class Document:
    """Token ids of one document: ``context`` is conditioned on, ``target`` is scored."""

    context: list[int]
    target: list[int]
    n_bytes: int | None = None
    n_words: int | None = None


def rolling_windows(
    seq: list[int], first: int, max_length: int, context_len: int = 1
) -> Iterator[tuple[int, int, int]]:
    """``(start, end, n)`` windows over ``seq`` scoring each of ``seq[first:]`` once.

    The window's input is ``seq[start:end]`` (at most ``max_length`` tokens) and its last ``n``
    positions are scored: they predict ``seq[end - n + 1 : end + 1]``. Every token after
    ``first`` (``first >= 1``) is predicted exactly once, from at least ``context_len`` tokens of
    the same document where the document allows (lm-eval's ``get_rolling_token_windows``
    for ``context_len=1``).
    """
    if not 1 <= context_len <= max_length:
        raise ValueError(f"context_len must be in [1, max_length={max_length}], got {context_len}")
    last = len(seq) - 1  # the index of the last token to predict
    done = first - 1  # tokens up to seq[done] are predicted (or context)
    if done >= last:
        return
    end = min(max_length, last)
    if end > done:  # the first window starts at the document's start
        yield 0, end, end - done
        done = end
    step = max_length - context_len + 1
    while done < last:
        end = min(done + step, last)
        yield max(0, end - max_length), end, end - done
        done = end


def prefix_tokens(tokenizer) -> list[int]:
    """The ids a document starts with: what the tokenizer adds in front, else BOS, else EOS."""
    probe = "a"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for k in range(len(with_special) - len(plain) + 1):
        if with_special[k : k + len(plain)] == plain and k > 0:
            return list(with_special[:k])
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int) and value >= 0:
            return [value]
    return []


def _words(text: str) -> int:
    """Words as lm-eval's ``wikitext`` task counts them (split at whitespace runs)."""
    return len(re.split(r"\s+", text))


def documents(records: Iterable[dict], tokenizer, text_field: str = "text", prefix: list[int] | None = None):
    """Records -> :class:`Document` (one per record, in order; empty texts skipped).

    ``prefix``: what the first token is predicted from (default :func:`prefix_tokens`).
    """
    start: list[int] | None = None

    def encode(text: object, i: int, what: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"record {i}: {what!r} must be a string, got {type(text).__name__}")
        if tokenizer is None:
            raise ValueError(
                f"record {i} holds text but no tokenizer is known: pass tokenizer= to Composer or give 'input_ids'"
            )
        return encode_bounded(tokenizer, [text], False)[0]  # a long document in bounded tokenizer calls

    for i, rec in enumerate(records):
        ids = rec.get("input_ids")
        if ids is not None:
            yield Document(list(ids[:1]), list(ids[1:]))
            continue
        if start is None:
            start = list(prefix) if prefix is not None else (prefix_tokens(tokenizer) if tokenizer is not None else [])
        prompt, completion = rec.get("prompt"), rec.get("completion")
        if prompt is not None and completion is not None:
            text = completion
            context, target = start + encode(prompt, i, "prompt"), encode(completion, i, "completion")
        elif rec.get(text_field) is not None:
            text = rec[text_field]
            context, target = list(start), encode(text, i, text_field)
        else:
            raise ValueError(
                f"record {i} has keys {sorted(k for k, v in rec.items() if v is not None)}; expected "
                f"{text_field!r}, 'input_ids', or 'prompt' + 'completion'"
            )
        if not target:
            continue
        yield Document(context, target, len(text.encode("utf-8")), _words(text))


def model_positions(model: torch.nn.Module) -> int | None:
    """The position limit of a model (a CALM composition: its anchor's), or ``None``."""
    for owner in (model, getattr(model, "anchor", None)):
        config = getattr(owner, "config", None)
        if config is not None and max_positions(config) is not None:
            return max_positions(config)
    return None


def _budget_rows(length: int, vocab: int, batch_size: int) -> int:
    return max(1, min(batch_size, LOGITS_BUDGET // max(1, length * vocab * 4)))


@torch.no_grad()
def _score_windows(model, windows: list[tuple[int, list[int], list[int]]], batch_size: int, pad: int, vocab: int):
    """Sum of log-probabilities of each window's targets: ``{doc_index: (sum, count)}``."""
    device = next(model.parameters()).device
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][1]))
    sums: dict[int, list[float]] = {}
    i = 0
    while i < len(order):
        length = len(windows[order[i]][1])
        rows = order[i : i + _budget_rows(length, vocab, batch_size)]
        i += len(rows)
        ids, mask = pad_batch([windows[w][1] for w in rows], pad)  # the first row is the longest: ``length``
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for r, w in enumerate(rows):
            doc, inp, tgt = windows[w]
            m, n = len(inp), len(tgt)
            lp = torch.log_softmax(logits[r, m - n : m].float(), dim=-1)
            got = lp.gather(-1, torch.tensor(tgt, device=lp.device)[:, None]).sum()
            acc = sums.setdefault(doc, [0.0, 0])
            acc[0] += float(got)
            acc[1] += n
    return sums


def score_documents(
    model: torch.nn.Module,
    documents: Iterable[Document],
    *,
    max_length: int,
    batch_size: int = 8,
    context_len: int = 1,
    pad_token_id: int = 0,
    max_documents: int | None = None,
    flush_every: int = 64,
) -> dict[str, float]:
    """Score ``documents`` one by one (windows batched across documents); totals and the measures.

    Returns ``loss`` (mean negative log-likelihood per scored token, nats), ``perplexity``
    (token-level), ``tokens``, ``documents``, and where every document knows its text:
    ``bits_per_byte``, ``byte_perplexity``, ``word_perplexity``, ``bytes``, ``words``.
    """
    vocab = int(getattr(model.config, "vocab_size", None) or 0) or 1
    was_training = model.training
    model.eval()
    total, tokens, docs, n_bytes, n_words, text_known = 0.0, 0, 0, 0, 0, True
    pending: list[tuple[int, list[int], list[int]]] = []

    def flush() -> None:
        nonlocal total, tokens
        for s, c in _score_windows(model, pending, batch_size, pad_token_id, vocab).values():
            total -= s
            tokens += c
        pending.clear()

    try:
        for doc in documents:
            if max_documents is not None and docs >= max_documents:
                break
            seq = list(doc.context) + list(doc.target)
            first = max(1, len(doc.context))
            for start, end, n in rolling_windows(seq, first, max_length, context_len):
                pending.append((docs, seq[start:end], seq[end - n + 1 : end + 1]))
            docs += 1
            if doc.n_bytes is None:
                text_known = False
            else:
                n_bytes += doc.n_bytes
                n_words += doc.n_words or 0
            if len(pending) >= flush_every:
                flush()
        flush()
    finally:
        model.train(was_training)
    loss = total / max(tokens, 1)
    out: dict[str, float] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens, "documents": docs}
    if text_known and n_bytes > 0:
        out.update(
            bits_per_byte=total / n_bytes / math.log(2),
            byte_perplexity=math.exp(min(total / n_bytes, 50.0)),
            word_perplexity=math.exp(min(total / max(n_words, 1), 700.0)),
            bytes=n_bytes,
            words=n_words,
        )
    return out
