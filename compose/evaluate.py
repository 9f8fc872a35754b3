"""Evaluation: perplexity on named sets, exact-match generation tasks, forgetting, plots.

Every function takes a :class:`~compose.Composer`, so the same evaluation runs for every
strategy. Tables and plots of the results: :mod:`compose.reports` (re-exported here).

>>> from compose import Composer
>>> from compose.testing import tiny_model
>>> c = Composer(tiny_model("llama"), strategy="lora", r=2)
>>> report = perplexity_report(c, {"general": [{"input_ids": list(range(3, 40))}]}, seq_len=16)
>>> sorted(report["general"])
['documents', 'loss', 'perplexity', 'tokens']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from . import packing
from .data import IGNORE, build_blocks, collate, load_records
from .data.padding import generation_pad_id, pad_batch, pad_id_of
from .guards import check_eval_batch_size
from .harness import lm_eval
from .reports import forgetting_report, format_table, plot_forgetting, plot_history, plot_perplexity
from .scoring import documents, model_positions, score_documents

if TYPE_CHECKING:
    from .composer import Composer

__all__ = [
    "eval_loss_sums",
    "evaluate_loss",
    "packed_loss",
    "perplexity_report",
    "exact_match",
    "forgetting_report",
    "format_table",
    "plot_history",
    "plot_perplexity",
    "plot_forgetting",
    "lm_eval",
]


@torch.no_grad()
def eval_loss_sums(
    model: torch.nn.Module,
    blocks: Any,
    batch_size: int,
    device,
    *,
    rank: int = 0,
    world: int = 1,
    max_batches: int | None = None,
    autocast=None,
) -> tuple[float, int]:
    """Summed next-token loss and token count over this process's share of ``blocks``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    idx = list(range(rank, len(blocks), world))
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    if max_batches is not None:
        batches = batches[:max_batches]
    try:
        for rows in batches:
            batch = blocks.batch(rows) if hasattr(blocks, "batch") else collate([blocks[i] for i in rows])
            batch = {k: v.to(device) for k, v in batch.items()}
            inputs = packing.model_inputs(batch, model)  # per-document attention when positions restart
            with autocast() if autocast is not None else torch.autocast(device_type="cpu", enabled=False):
                logits = model(**inputs).logits
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=IGNORE,
                reduction="sum",
            )
            total += float(loss)
            count += int((labels != IGNORE).sum())
    finally:
        model.train(was_training)
    return total, count


def evaluate_loss(
    composer: Composer,
    data: Any,
    *,
    batch_size: int = 8,
    seq_len: int | None = None,
    context_len: int = 1,
    prefix_token_id: int | list[int] | None = None,
    text_field: str = "text",
    max_batches: int | None = None,
    max_documents: int | None = None,
    **load_kwargs: Any,
) -> dict[str, float]:
    """The standard per-document measure of ``composer.model`` on ``data`` (see :mod:`compose.scoring`).

    ``seq_len``: the window (default: the model's position limit, at most 2048); ``context_len``:
    the least context of a later window's first token (1 = lm-eval's ``loglikelihood_rolling``);
    ``prefix_token_id``: what the first token is predicted from (default: the tokenizer's own
    document-start tokens, else BOS, else EOS). ``max_batches`` limits the set to
    ``max_batches * batch_size`` documents (or ``max_documents``). Returns ``loss``,
    ``perplexity``, ``tokens``, ``documents`` and, for text, ``bits_per_byte``,
    ``byte_perplexity``, ``word_perplexity``, ``bytes``, ``words``.
    """
    check_eval_batch_size(batch_size)
    model = composer.model
    if seq_len is None:
        seq_len = min(model_positions(model) or 2048, 2048)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    composer._check_positions(seq_len)  # every base model's limit, the augmenting ones' too
    if max_documents is None and max_batches is not None:
        max_documents = max_batches * batch_size
    prefix = [prefix_token_id] if isinstance(prefix_token_id, int) else prefix_token_id
    docs = documents(load_records(data, text_field=text_field, **load_kwargs), composer.tokenizer, text_field, prefix)
    return score_documents(
        model,
        docs,
        max_length=seq_len,
        batch_size=batch_size,
        context_len=context_len,
        pad_token_id=_pad_id(composer),
        max_documents=max_documents,
    )


def packed_loss(
    composer: Composer,
    data: Any,
    *,
    batch_size: int = 8,
    seq_len: int | None = None,
    packing: bool = True,
    max_batches: int | None = None,
    **data_kwargs: Any,
) -> dict[str, float]:
    """Loss over packed blocks of ``seq_len`` tokens, as ``fit`` measures ``eval_data`` (token-weighted).

    Documents are packed and cut as for training, so this is not the standard perplexity
    (use :func:`evaluate_loss`); it is what the training log's ``eval_loss`` reports.
    """
    model = composer.model
    if seq_len is None:
        seq_len = min(getattr(model.config, "max_position_embeddings", None) or 1024, 1024)
    blocks = build_blocks(
        data, composer.tokenizer, seq_len, packing=packing, pad_token_id=pad_id_of(model.config), **data_kwargs
    )
    device = next(model.parameters()).device
    total, count = eval_loss_sums(model, blocks, batch_size, device, max_batches=max_batches)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def perplexity_report(
    composer: Composer,
    sets: Mapping[str, Any],
    *,
    batch_size: int = 8,
    seq_len: int | None = None,
    max_batches: int | None = None,
    **data_kwargs: Any,
) -> dict[str, dict[str, float]]:
    """``{name: {"loss", "perplexity", "tokens"}}`` for each named data source (any form ``fit`` takes)."""
    return {
        name: evaluate_loss(
            composer, source, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches, **data_kwargs
        )
        for name, source in sets.items()
    }


def _pad_id(composer: Composer) -> int:
    return generation_pad_id(composer.tokenizer, getattr(composer.model, "config", None))


def _as_ids(value: Any, tokenizer, what: str, index: int, *, special: bool) -> list[int]:
    if isinstance(value, str):
        if tokenizer is None:
            raise ValueError(
                f"example {index}: {what} is text but no tokenizer is known; pass token ids (lists of ints) "
                "or give the Composer a tokenizer"
            )
        return list(tokenizer(value, add_special_tokens=special)["input_ids"])
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)) and all(isinstance(t, int) for t in value):
        return [int(t) for t in value]
    raise TypeError(f"example {index}: {what} must be a string or a list of token ids, got {type(value).__name__}")


def exact_match(
    composer: Composer,
    examples: Any,
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    stop: str | None = "\n",
    normalize: Callable[[str], str] = str.strip,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
) -> dict[str, Any]:
    """Greedy-decode each prompt and compare the continuation with its answer.

    ``examples``: records ``{"prompt": ..., "answer": ...}`` (a list, a jsonl path, a
    ``datasets.Dataset``). Text prompts need the Composer's tokenizer; the continuation is
    decoded, cut at ``stop`` and ``normalize``-d before comparison with the normalized
    answer. Prompts and answers given as token-id lists need no tokenizer: the first
    ``len(answer)`` generated tokens must equal the answer.

    Prompts are batched with left padding. ``max_new_tokens`` defaults to the longest
    answer's token count plus 8 (text) or the longest answer (ids).

    Returns ``{"accuracy", "correct", "total", "predictions"}``.
    """
    tok = composer.tokenizer
    prompts, answers, text_mode = _examples(examples, tok, prompt_field, answer_field)
    answer_lens = [
        len(_as_ids(a, tok, answer_field, i, special=False)) if (not t or tok is not None) else len(a)
        for i, (a, t) in enumerate(zip(answers, text_mode))
    ]
    if max_new_tokens is None:
        max_new_tokens = max(answer_lens) + (8 if any(text_mode) else 0)
    pad = _pad_id(composer)
    predictions: list[Any] = []
    correct = 0
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad_batch(prompts[start : start + batch_size], pad, side="left")
        out = composer.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
        for r, gen in enumerate(out[:, ids.shape[1] :].cpu().tolist()):
            pred, ok = _judge(gen, answers[start + r], text_mode[start + r], tok, stop, normalize)
            predictions.append(pred)
            correct += int(ok)
    total = len(prompts)
    return {"accuracy": correct / total, "correct": correct, "total": total, "predictions": predictions}


def _examples(examples: Any, tok, prompt_field: str, answer_field: str) -> tuple[list[list[int]], list, list[bool]]:
    """The prompts (as token ids), the answers (as given) and whether each answer is text."""
    records = load_records(examples) if not isinstance(examples, (list, tuple)) else list(examples)
    prompts, answers, text_mode = [], [], []
    for i, rec in enumerate(records):
        if prompt_field not in rec or answer_field not in rec:
            raise ValueError(f"example {i} has keys {sorted(rec)}; expected {prompt_field!r} and {answer_field!r}")
        prompts.append(_as_ids(rec[prompt_field], tok, prompt_field, i, special=True))
        answers.append(rec[answer_field])
        text_mode.append(isinstance(rec[answer_field], str))
    if not prompts:
        raise ValueError("no examples to evaluate")
    return prompts, answers, text_mode


def _judge(gen: list[int], answer: Any, text: bool, tok, stop: str | None, normalize) -> tuple[Any, bool]:
    """The prediction read from the generated ids ``gen``, and whether it matches ``answer``."""
    if text:
        pred = tok.decode(gen, skip_special_tokens=True) if tok is not None else ""
        if stop:
            # the first non-empty segment: a model may open its answer with the stop string
            pred = next((part for part in pred.split(stop) if part.strip()), "")
        return pred, normalize(pred) == normalize(answer)
    pred = gen[: len(answer)]
    return pred, pred == [int(t) for t in answer]
