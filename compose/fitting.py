"""What ``Composer.fit`` does around training: its options as one config, the checks before the first
step, and the run directory (locked while training, marked complete last)."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .datachecks import check_data_file, check_token_ids, vocab_size
from .guards import check_finite_weights, check_text_records, check_tokenizer_on_text
from .io import (
    LOCK_NAME,
    RUN_MARKER,
    check_replaceable,
    mark_complete,
    output_lock,
    prepare_run_directory,
    recover_directory,
)
from .rules import check_names

__all__ = ["fit_config", "check_fit_data", "run_directory"]


def fit_config(config: Any, options: dict[str, Any]) -> Any:
    """The :class:`~compose.train.TrainConfig` of a ``fit`` call: built (and so checked) once, here.

    ``options`` alone, or ``config`` with ``options`` replacing some of its fields.
    """
    from .train import TrainConfig

    check_names(TrainConfig, options, what="training option")
    if config is None:
        return TrainConfig(**options)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a compose.train.TrainConfig, got {type(config).__name__}")
    return dataclasses.replace(config, **options) if options else config


def check_fit_data(composer: Any, config: Any, train_data: Any, eval_data: Any) -> None:
    """What can be seen before training starts: positions of every base model, token ids in range."""
    composer._check_positions(config.seq_len)
    check_finite_weights(composer.model, "train", trainable=False)
    vocab = vocab_size(composer.model)
    for name, data in (("train_data", train_data), ("eval_data", eval_data)):
        check_data_file(data, config.text_field)
        check_text_records(data, name, config.text_field)
        check_token_ids(data, vocab, name)
        check_tokenizer_on_text(composer.tokenizer, data, name, packing=config.packing, text_field=config.text_field)
        composer.strategy.check_data(composer.model, data, name)


@contextlib.contextmanager
def run_directory(out: Path, config: Any, strategy_name: str) -> Iterator[None]:
    """``out`` locked and prepared for the run (a previous run refused unless ``resume``/``overwrite``);
    ``complete.json`` written when the body finished; a run that failed before writing anything leaves nothing."""
    created = not out.exists()
    try:
        with output_lock(out):
            recover_directory(out / "final")  # a save interrupted between its renames, by an earlier run
            if config.save_final:
                check_replaceable(out / "final", what="the final model directory")
            prepare_run_directory(out, resume=config.resume, overwrite=config.overwrite_output_dir)
            yield
            if config.save_final:
                mark_complete(out, {"steps": config.max_steps, "strategy": strategy_name})
    except BaseException:
        if created and out.is_dir() and {p.name for p in out.iterdir()} <= {LOCK_NAME, RUN_MARKER}:
            shutil.rmtree(out, ignore_errors=True)  # a run that failed before writing anything leaves nothing
        raise
