"""``check_recipe``: every check that needs no weights, per stage, with trainable parameter counts.

Models are built on the ``meta`` device from their configs (local directories, ``tiny:``
stand-ins, hub ids already in the cache), so the strategy's own checks run (block
indices, ``num_blocks`` against the model's size, families) and the trainable
parameters are counted without allocating or downloading anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..chat import check_template_option
from ..datachecks import check_data_file
from ..strategies import get_strategy
from .schema import RecipeError, _as_list, to_container
from .stages import Recipe, check_model, load_recipe, looks_local, stage_sources

__all__ = ["check_recipe"]


def check_recipe(source: str | os.PathLike | dict, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Validate a recipe fully without loading weights or downloading anything.

    Checks the schema and every value, each stage's strategy and options (against the models'
    configs where they are available offline), the training options, that local paths
    (models, tokenizers, data files) exist, and that local text data is UTF-8 (``.jsonl``: one
    JSON record per line). ``recipe.counts`` maps each stage to its number of
    trainable parameters, or to a note saying why it could not be counted.
    """
    recipe = load_recipe(source, overrides)
    previous: Any = None
    for index, stage in enumerate(recipe.stages):
        cfg = stage.config
        sw = recipe.where + (f" (stage {stage.name!r})" if stage.name else "")
        produced = recipe.config.output.dir if index else None  # earlier stages write under output.dir
        if not stage.chained:
            check_model(cfg.anchor, f"{sw}: anchor", produced)
        for a in _as_list(to_container(cfg.augment)):
            check_model(a, f"{sw}: augment", produced)
        tokenizer = cfg.data.tokenizer
        if tokenizer and looks_local(tokenizer) and not Path(tokenizer).expanduser().exists():
            raise RecipeError(f"{sw}: data.tokenizer {tokenizer!r} does not exist")
        try:
            check_template_option(cfg.data.chat_template)
        except FileNotFoundError as e:
            raise RecipeError(f"{sw}: data.chat_template: {e}") from None
        for where, src in stage_sources(cfg):
            path = src.get("path") if isinstance(src, dict) else src
            try:
                check_data_file(path)  # eval sets too: nothing fails after training for a bad file
            except ValueError as e:
                raise RecipeError(f"{sw}: {where}: {e}") from None
        if cfg.eval.get("lm_eval"):
            _check_lm_eval_available(sw)
        previous = _count(recipe, stage, sw, previous)
    return recipe


def _check_lm_eval_available(where: str) -> None:
    """``eval.lm_eval`` runs after training: its dependencies are checked before."""
    import importlib.util

    from .. import evaluate

    if not hasattr(evaluate, "lm_eval"):
        raise RecipeError(f"{where}: eval.lm_eval needs compose.evaluate.lm_eval, which this compose lacks")
    if importlib.util.find_spec("lm_eval") is None:
        raise RecipeError(f"{where}: eval.lm_eval needs the lm-evaluation-harness package: pip install lm-eval")


def _meta_config(source: Any, previous: Any):
    """The config of a model source, offline, or ``None`` with no way to know it here."""
    from transformers import AutoConfig

    from ..testing import TINY_PREFIX, parse_tiny_spec, tiny_config

    if previous is not None:
        return previous
    if source.startswith(TINY_PREFIX):
        family, kwargs = parse_tiny_spec(source)
        kwargs.pop("seed", None)
        return tiny_config(family, **kwargs)
    try:
        return AutoConfig.from_pretrained(str(Path(source).expanduser()), local_files_only=True)
    except Exception:  # noqa: BLE001 - a hub id not in the cache: counted at run time only
        return None


def _count(recipe: Recipe, stage, sw: str, previous: Any) -> Any:
    """Build the stage's composed model on the meta device; record its trainable count; return its config."""
    import torch
    from transformers import AutoModelForCausalLM

    from .. import arch
    from ..composer import Composer

    cfg = stage.config
    name = stage.name or "main"
    anchor_cfg = _meta_config(cfg.anchor, previous if stage.chained else None)
    augment_cfgs = [_meta_config(str(a), None) for a in _as_list(to_container(cfg.augment))]
    if anchor_cfg is None or any(c is None for c in augment_cfgs):
        recipe.counts[name] = "not counted: a hub model is not in the local cache (it is fetched at run time)"
        return None
    for role, c in [("anchor", anchor_cfg)] + [("augment", c) for c in augment_cfgs]:
        limit = arch.max_positions(c)
        if limit is not None and cfg.data.seq_len > limit:
            raise RecipeError(f"{sw}: data.seq_len={cfg.data.seq_len} is beyond the {role}'s {limit} positions")
    strategy = get_strategy(cfg.strategy)
    try:
        with torch.device("meta"):
            anchor = AutoModelForCausalLM.from_config(anchor_cfg)
            augments = [AutoModelForCausalLM.from_config(c) for c in augment_cfgs]
            composer = Composer(
                anchor,
                augments if len(augments) > 1 else (augments[0] if augments else None),
                strategy=stage.strategy_config,
                copy_model=False,
            )
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{sw}: {e}") from None
    except Exception as e:
        if not strategy.build_reads_weights:  # a strategy's own bug, or a check it makes: reported, not hidden
            raise RecipeError(
                f"{sw}: building the {cfg.strategy} model on the meta device failed: {type(e).__name__}: {e}"
            ) from e
        recipe.counts[name] = f"not counted: building on the meta device failed ({type(e).__name__})"
        return None
    recipe.counts[name] = sum(p.numel() for p in composer.trainable_parameters().values())
    config = getattr(composer.model, "config", None)
    return config if strategy.saves_full_model else None
