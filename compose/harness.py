"""Run lm-evaluation-harness tasks on any model compose builds.

Every strategy's model goes through the harness's own ``HFLM`` wrapper, given as an
already loaded model, so the numbers are the harness's numbers (same prompts, same
metrics, same few-shot sampling) and compare with published ones. ``lm_eval`` is
imported only when a task is run: ``import compose`` stays light.

>>> from compose import Composer
>>> from compose.testing import tiny_model, tiny_tokenizer
>>> c = Composer(tiny_model("llama"), strategy="block_expand", num_blocks=2, tokenizer=tiny_tokenizer())
>>> scores = lm_eval(c, tasks=["compose_tiny_choice"], include_path="tests/data/lm_eval")  # doctest: +SKIP
>>> scores["compose_tiny_choice"]["acc"]  # doctest: +SKIP
0.5

Task names are the harness's (``gsm8k``, ``mmlu``, ``humaneval``, ``flores200:...``); tasks
of your own are YAML files in a folder passed as ``include_path``.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["lm_eval", "LmEvalResults", "compact_results"]

_INSTALL_HINT = "pip install lm_eval"


class LmEvalResults(dict):
    """``{task: {metric: value}}``; the harness's full output is in :attr:`raw`.

    Metric names are the harness's without the ``,none`` filter suffix (``acc``,
    ``acc_norm``, ``exact_match``); a metric computed under a named filter keeps it
    (``exact_match,strict-match`` for GSM8K). Standard errors are ``<metric>_stderr``.
    """

    raw: dict[str, Any]

    def __init__(self, scores: dict[str, dict[str, float]], raw: dict[str, Any]):
        super().__init__(scores)
        self.raw = raw


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(
            f"running harness tasks needs lm-evaluation-harness, which is not installed: {_INSTALL_HINT}"
        ) from e
    return simple_evaluate, HFLM, TaskManager


def _task_list(tasks: str | Sequence[str]) -> list[str]:
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [str(t).strip() for t in tasks if str(t).strip()]
    if not names:
        raise ValueError("tasks is empty: name at least one lm-evaluation-harness task, e.g. tasks=['gsm8k']")
    return names


def _include_paths(include_path: Any) -> tuple[str, ...]:
    if include_path is None:
        return ()
    paths = include_path if isinstance(include_path, (list, tuple)) else [include_path]
    out = []
    for p in paths:
        if not os.path.isdir(p):
            raise FileNotFoundError(
                f"include_path {str(p)!r} is not a directory: pass the folder that holds your task YAML files"
            )
        out.append(os.path.abspath(p))
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _task_manager(include: tuple[str, ...], defaults: bool):
    # Indexing the harness's own ~15k task configs takes seconds; do it once per process,
    # and not at all when every task asked for is in the user's folder.
    _, _, TaskManager = _import_lm_eval()
    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


def _resolve_tasks(names: list[str], include: tuple[str, ...]):
    if include:
        local = _task_manager(include, False)
        if all(n in local.all_tasks for n in names):
            return local
    manager = _task_manager(include, True)
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        lines = []
        for n in unknown:
            close = difflib.get_close_matches(n, known, n=5, cutoff=0.6)
            lines.append(f"{n!r}" + (f" (did you mean: {', '.join(close)}?)" if close else ""))
        where = f" or in include_path {', '.join(include)}" if include else ""
        raise ValueError(
            f"unknown lm-evaluation-harness task {'; '.join(lines)}: not among the harness's tasks{where}. "
            "List them with `lm-eval ls tasks`; a task of your own is a YAML file in a folder passed as include_path."
        )
    return manager


def _resolve_model_and_tokenizer(model: Any, tokenizer: Any):
    if not isinstance(model, nn.Module):
        # A Composer (duck-typed to keep this module free of the facade).
        inner = getattr(model, "model", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or a Composer, got {type(model).__name__}")
        if tokenizer is None:
            tokenizer = getattr(model, "tokenizer", None)
        model = inner
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    if tokenizer is None and source:
        from transformers import AutoTokenizer

        try:  # the tokenizer saved beside the model, as HFLM itself would look for it
            tokenizer = AutoTokenizer.from_pretrained(str(source))
        except (OSError, ValueError):
            tokenizer = None
    if tokenizer is None:
        raise ValueError(
            "lm_eval needs a tokenizer and none was given or found: pass tokenizer= (a tokenizer object, "
            "a local folder or a hub id), or save the tokenizer beside the model"
        )
    return model, tokenizer


def compact_results(raw: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from the harness's ``results`` section (numbers only)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in raw.get("results", {}).items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            if "," not in key or isinstance(value, str) or value is None:
                continue  # alias, name, sample_len, "N/A" standard errors
            metric, _, filt = key.partition(",")
            name = metric if filt == "none" else f"{metric},{filt}"
            if name.endswith("_stderr") or "_stderr," in name:
                name = name.replace("_stderr", "") + "_stderr"
            row[name] = float(value)
        out[task] = row
    return out


def lm_eval(
    model: Any,
    tokenizer: Any = None,
    *,
    tasks: str | Sequence[str],
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    device: str | torch.device | None = None,
    confirm_run_unsafe_code: bool = False,
) -> LmEvalResults:
    """Run lm-evaluation-harness ``tasks`` on ``model`` through the harness's ``HFLM``.

    Args:
        model: a :class:`~compose.Composer` (its model and tokenizer are used) or the model
            itself (``block_expand``/``full``: the transformers model; ``lora``: the peft
            model; ``calm``: the composed model).
        tokenizer: a tokenizer, or a folder / hub id to load one from; default: the
            Composer's.
        tasks: harness task or group names, a list or one comma-separated string.
        num_fewshot: examples in each prompt (default: each task's own).
        limit: at most this many documents per task (a float < 1: a fraction); for quick
            checks only, the scores are then not comparable with published ones.
        batch_size: sequences per forward pass.
        include_path: folder(s) with task YAML files of your own.
        device: move the model there first (default: where it already is).
        confirm_run_unsafe_code: let tasks that execute the generated code run (HumanEval,
            MBPP); they also need the environment variable ``HF_ALLOW_CODE_EVAL=1``.

    Returns:
        :class:`LmEvalResults`: ``{task: {metric: value}}``, with the harness's full output
        in ``.raw``.
    """
    simple_evaluate, HFLM, _ = _import_lm_eval()
    names = _task_list(tasks)
    manager = _resolve_tasks(names, _include_paths(include_path))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    net, tok = _resolve_model_and_tokenizer(model, tokenizer)
    if device is not None:
        net.to(device)
    was_training = net.training
    try:
        raw = simple_evaluate(
            model=_hflm(HFLM, net, tok, batch_size),
            tasks=names,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            confirm_run_unsafe_code=confirm_run_unsafe_code,
        )
    finally:
        net.train(was_training)
    if raw is None:  # non-main ranks under torch.distributed get nothing back
        return LmEvalResults({}, {})
    return LmEvalResults(compact_results(raw), raw)


def _hflm(HFLM, net: nn.Module, tok: Any, batch_size: int):
    """The harness's ``HFLM`` around the loaded model ``net``."""
    # HFLM warns about accelerate and parallelize options whenever it is handed a loaded
    # model; none of them apply here.
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        return HFLM(pretrained=net, tokenizer=tok, batch_size=batch_size)
    finally:
        hf_logger.setLevel(level)
