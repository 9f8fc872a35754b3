"""Reading a recipe: overrides, stages, and the checks that need no model or data."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..loading import DTYPES
from ..paths import looks_local
from ..rules import OptionError, Rule, check_value
from ..strategies import STRATEGIES, StrategyConfig, get_strategy, make_config
from ..testing import TINY_PREFIX, parse_tiny_spec
from ..validation import check_path_component
from .overrides import apply_override, has_key, parse_override
from .schema import (
    SOURCE_KEYS,
    STAGE_KEYS,
    RecipeError,
    _as_list,
    check_section_shapes,
    keys_schema,
    merge,
    to_container,
    validate_sections,
)

__all__ = ["Stage", "Recipe", "load_recipe"]

_POSITIVE_NUMBER = Rule(gt=0)
_AT_LEAST_ONE = Rule(ge=1)


@dataclass
class Stage:
    """One resolved run: a full recipe without stages, plus where it comes from."""

    name: str | None
    config: DictConfig
    chained: bool = False
    """True when the anchor is the previous stage's output (it does not exist before the run)."""
    strategy_config: StrategyConfig | None = None
    """The strategy's options as its config object (set, and so checked, by ``load_recipe``)."""
    train_config: Any = None
    """The stage's :class:`~compose.train.TrainConfig` (set, and so checked, by ``load_recipe``)."""

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output.dir)


@dataclass
class Recipe:
    """A validated recipe: ``config`` (top level, overrides applied) and its resolved ``stages``."""

    config: DictConfig
    path: Path | None = None
    overrides: list[str] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    counts: dict[str, int | str] = field(default_factory=dict)
    """Trainable parameters per stage (set by ``check_recipe``), or a note why one was not counted."""

    @property
    def where(self) -> str:
        return str(self.path) if self.path else "recipe"

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(self.config, resolve=True)


def _read(source: str | os.PathLike | dict) -> tuple[dict, Path | None]:
    if isinstance(source, dict):
        return copy.deepcopy(source), None
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(source)!r} does not exist")
    try:
        loaded = OmegaConf.create(path.read_text() or "{}")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except Exception as e:  # noqa: BLE001 - YAML errors come in several types
        raise RecipeError(f"{path}: not valid YAML ({e})") from None
    raw = OmegaConf.to_container(loaded, resolve=False)
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    return raw, path


def load_recipe(source: str | os.PathLike | dict, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe (a YAML path or a dict); no model or data is loaded.

    Raises :class:`RecipeError` naming the file and the offending key.
    """
    raw, path = _read(source)
    where = str(path) if path else "recipe"
    if isinstance(overrides, str):
        raise RecipeError(f"overrides must be a list of key=value strings, got the string {overrides!r}")
    parsed = [parse_override(o) for o in overrides]
    for key, value in parsed:
        apply_override(raw, key, value)
    raw["stages"] = [] if raw.get("stages") is None else raw["stages"]
    if not isinstance(raw["stages"], list):
        raise RecipeError(f"{where}: stages must be a list of partial recipes, got {raw['stages']!r}")
    check_section_shapes(raw, where)
    config = merge(keys_schema(), raw, where=where)
    if OmegaConf.is_missing(config, "strategy"):
        raise RecipeError(f"{where}: no strategy; give one of {', '.join(sorted(STRATEGIES))}")
    if config.output.dir is None:
        config.output.dir = str(Path("runs") / (path.stem if path else "recipe"))
    recipe = Recipe(config=config, path=path, overrides=list(overrides))
    recipe.stages = _resolve_stages(recipe, raw, parsed)
    for prev, stage in zip(recipe.stages, recipe.stages[1:]):
        if (
            stage.chained
            and prev.config.strategy in STRATEGIES
            and not get_strategy(prev.config.strategy).saves_full_model
        ):
            raise RecipeError(
                f"{where}: stage {stage.name!r} starts from stage {prev.name!r}'s output, but a "
                f"{prev.config.strategy!r} output is not a full model; give stage {stage.name!r} an anchor"
            )
    for stage in recipe.stages:
        validate_stage(stage, where)
    return recipe


def _stage_name(st: dict, i: int, sw: str, names: set[str]) -> str:
    name = st.pop("name", None)
    name = f"stage{i + 1}" if name is None else name
    try:
        check_path_component("name", name)
    except OptionError as e:
        raise RecipeError(f"{sw}: stage {e}") from None
    if name in names:
        raise RecipeError(f"{sw}: stage name {name!r} is used twice; stage names must be unique")
    names.add(name)
    return name


def _resolve_stages(recipe: Recipe, raw: dict, overrides: list[tuple[str, Any]]) -> list[Stage]:
    where = recipe.where
    base_dict = {k: v for k, v in to_container(recipe.config).items() if k != "stages"}
    if not raw["stages"]:
        return [Stage(name=None, config=merge(keys_schema(), base_dict, where=where))]
    top_overrides = [(k, v) for k, v in overrides if not k.startswith("stages.")]
    stages: list[Stage] = []
    names: set[str] = set()
    for i, st in enumerate(raw["stages"]):
        sw = f"{where}: stages[{i}]"
        if not isinstance(st, dict):
            raise RecipeError(f"{sw}: a stage is a mapping (a partial recipe), got {type(st).__name__}")
        unknown = sorted(set(st) - set(STAGE_KEYS))
        if unknown:
            raise RecipeError(
                f"{sw}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(STAGE_KEYS)}"
            )
        st = copy.deepcopy(st)
        check_section_shapes(st, sw)
        for key, value in top_overrides:  # command-line overrides win inside stages too
            if has_key(st, key):
                apply_override(st, key, value)
        name = _stage_name(st, i, sw, names)
        stages.append(_stage(base_dict, st, name, i, sw, stages[-1] if stages else None))
    return stages


def _stage(base_dict: dict, st: dict, name: str, i: int, sw: str, prev: Stage | None) -> Stage:
    options = st.pop("options", None)
    base = copy.deepcopy(base_dict)
    for section, key in (("", "augment"), ("data", "train"), ("data", "eval")):
        # free-form values (a source, or a list of them): a stage's value replaces the top level's
        holder, stage_holder = (base, st) if not section else (base[section], st.get(section) or {})
        if isinstance(stage_holder, dict) and key in stage_holder:
            holder[key] = None
    merged = merge(keys_schema(), base, st, where=sw)
    # ${output.dir} in a stage means the recipe's output dir, not the stage's (set below)
    OmegaConf.resolve(merged)
    if options is None:
        options = base_dict["options"] if merged.strategy == base_dict["strategy"] else {}
    merged.options = options
    chained = prev is not None and "anchor" not in st
    if chained:
        merged.anchor = str(prev.output_dir / "final")
        # the previous stage saved its tokenizer beside its weights
        if "tokenizer" not in (st.get("data") or {}):
            merged.data.tokenizer = None
    merged.output.dir = str(Path(base_dict["output"]["dir"]) / name)
    return Stage(name=name, config=merged, chained=chained)


def validate_stage(stage: Stage, where: str) -> None:
    """Every check a stage allows without loading a model: strategy, options, values, sources."""
    cfg = stage.config
    sw = f"{where}" + (f" (stage {stage.name!r})" if stage.name else "")
    try:
        strategy_cls = get_strategy(cfg.strategy) if isinstance(cfg.strategy, str) else None
        if strategy_cls is None:
            raise RecipeError(f"strategy must be a name, got {cfg.strategy!r}")
        stage.strategy_config = make_config(cfg.strategy, to_container(cfg.options))
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{sw}: options: {e}" if isinstance(e, OptionError) else f"{sw}: {e}") from None
    stage.train_config = validate_sections(cfg, sw)
    if cfg.anchor is None:
        raise RecipeError(f"{sw}: no anchor model (a hub id, a local directory or tiny:FAMILY)")
    augments = _as_list(to_container(cfg.augment))
    if strategy_cls.takes_augment and not augments:
        raise RecipeError(f"{sw}: strategy {cfg.strategy!r} needs an augmenting model (augment: ...)")
    if not strategy_cls.takes_augment and augments:
        raise RecipeError(f"{sw}: strategy {cfg.strategy!r} takes no augmenting model; remove augment")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise RecipeError(f"{sw}: dtype {cfg.dtype!r} is not one of float32, bfloat16, float16")
    if not _as_list(to_container(cfg.data.train)):
        raise RecipeError(f"{sw}: data.train is empty; give a file, a hub dataset or a list of them")
    for where_, src in stage_sources(cfg):
        check_source(src, f"{sw}: {where_}")
    unknown_domain = sorted(set(cfg.eval.domain) - set(cfg.eval.perplexity))
    if unknown_domain:
        raise RecipeError(f"{sw}: eval.domain names {unknown_domain} that are not eval.perplexity sets")


def stage_sources(cfg: DictConfig) -> list[tuple[str, Any]]:
    """``(where, source)`` for every data source a stage reads: training, eval loss, evaluation sets."""
    out = [(f"data.{key}", src) for key in ("train", "eval") for src in _as_list(to_container(cfg.data[key]))]
    for section in ("perplexity", "exact_match"):
        out += [(f"eval.{section}.{name}", src) for name, src in to_container(cfg.eval[section]).items()]
    return out


def check_source(src: Any, where: str) -> None:
    if isinstance(src, dict):
        unknown = sorted(set(src) - set(SOURCE_KEYS))
        if unknown:
            raise RecipeError(
                f"{where}: unknown key(s) {unknown} in a data source; valid keys: {', '.join(SOURCE_KEYS)}"
            )
        if "path" not in src:
            raise RecipeError(f"{where}: a data source mapping needs 'path'")
        if not isinstance(src.get("columns") or {}, dict):
            raise RecipeError(f"{where}: columns must be a mapping {{old_name: new_name}}")
        try:
            check_value("weight", src.get("weight", 1.0), float, _POSITIVE_NUMBER)
            check_value("max_records", src.get("max_records"), int | None, _AT_LEAST_ONE)
            check_value("split", src.get("split"), str | None)
        except OptionError as e:
            raise RecipeError(f"{where}: {e}") from None
        src = src["path"]
    if not isinstance(src, str):
        raise RecipeError(f"{where}: a data source is a path, a hub dataset name or a mapping, got {src!r}")
    if looks_local(src) and not Path(src).expanduser().exists():
        raise RecipeError(f"{where}: data file {src!r} does not exist")


def check_model(src: Any, where: str, produced: str | None = None) -> None:
    if not isinstance(src, str):
        raise RecipeError(f"{where}: a model is a hub id, a local directory or tiny:FAMILY, got {src!r}")
    if src.startswith(TINY_PREFIX):
        try:
            parse_tiny_spec(src)
        except ValueError as e:
            raise RecipeError(f"{where}: {e}") from None
    elif produced is not None and _inside(src, produced):
        return  # written by an earlier stage of this recipe
    elif looks_local(src) and not Path(src).expanduser().is_dir():
        raise RecipeError(f"{where}: model directory {src!r} does not exist")


def _inside(path: str, root: str) -> bool:
    p, r = Path(path).expanduser().resolve(), Path(root).expanduser().resolve()
    return p == r or r in p.parents
