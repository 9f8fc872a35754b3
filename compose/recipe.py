"""YAML recipes: a validated schema, ``key=value`` overrides, multi-stage runs.

A recipe names the models, the strategy and its options, the data, the training
options, the evaluation sets and where the result goes::

    # compose train recipes/tiny/block_expand.yaml train.max_steps=20
    anchor: tiny:llama
    strategy: block_expand
    options: {num_blocks: 2}
    data: {train: recipes/tiny/data/code.txt, seq_len: 64}
    train: {max_steps: 50, learning_rate: 1e-3, batch_size: 4}
    eval:
      perplexity: {general: recipes/tiny/data/general.txt, code: recipes/tiny/data/code.txt}
    output: {dir: runs/tiny_block_expand}

The schema is an OmegaConf structured config, so a misspelt key anywhere is an error
naming it and the valid keys. The ``train`` section is generated from
:class:`compose.train.TrainConfig`, so the two cannot drift; the data options of
``TrainConfig`` (``seq_len``, ``packing``, ``mask_prompt``, ``text_field``) live in
``data`` and ``output_dir`` is ``output.dir``.

**Stages** (LLaMA Pro: expansion training, then full SFT): ``stages`` is a list of
partial recipes, each merged over the top level. A stage that names another strategy
starts with that strategy's default options; a stage after the first that names no
``anchor`` starts from the previous stage's result (``<output.dir>/<previous>/final``).
Stage ``k`` writes to ``<output.dir>/<stage name>``.

**Overrides** (``load_recipe(path, ["train.max_steps=2"])``, or ``compose train RECIPE
k=v ...``) win everywhere: a key set inside a stage is overridden there too. Address a
single stage with ``stages.1.train.learning_rate=1e-5``.

**Test stand-ins**: an ``anchor``/``augment`` of the form ``tiny:FAMILY`` or
``tiny:FAMILY?hidden=48&layers=2&seed=1`` is a tiny random model from
:func:`compose.testing.tiny_model`, with a character-level tokenizer; recipes under
``recipes/tiny`` use them so that they run anywhere in seconds. They are resolved only
here, never by :class:`~compose.Composer`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from .strategies import STRATEGIES, get_strategy, make_config
from .testing import tiny_tokenizer
from .train import TrainConfig

__all__ = [
    "RecipeError",
    "Recipe",
    "load_recipe",
    "check_recipe",
    "run_recipe",
    "resolve_model",
    "tiny_tokenizer",
    "load_output",
    "RECIPE_FILE",
]

RECIPE_FILE = "recipe.yaml"
TINY_PREFIX = "tiny:"
# TrainConfig fields that belong to other sections (or are not recipe material).
_DATA_KEYS = ("seq_len", "packing", "mask_prompt", "text_field")
_MOVED = {**{k: f"data.{k}" for k in _DATA_KEYS}, "output_dir": "output.dir", "save_final": None, "callbacks": None}
_SOURCE_KEYS = ("path", "name", "data_dir", "split", "columns", "weight", "max_records")


class RecipeError(ValueError):
    """A recipe that does not validate; the message names the recipe file and the key."""


# ---------------------------------------------------------------------------- schema
def _train_default(name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


@dataclass
class DataSection:
    """What to train on."""

    train: Any = None
    """A source or a list of sources: a local .txt/.jsonl/.parquet file, a hub dataset name, or a mapping
    ``{path, name, data_dir, split, columns, weight, max_records}``: ``name``/``data_dir``/``split`` go to
    ``datasets.load_dataset``, ``columns`` renames fields (``{content: text}``), ``weight`` repeats a source's
    blocks (1.5 = all once, half of them twice), ``max_records`` keeps the first N records."""
    eval: Any = None
    """Held-out source(s) whose loss is logged during training (``eval_loss``)."""
    tokenizer: str | None = None
    """Tokenizer path or hub id; default: the one beside the anchor."""
    seq_len: int = _train_default("seq_len")
    packing: bool = _train_default("packing")
    mask_prompt: bool = _train_default("mask_prompt")
    text_field: str = _train_default("text_field")


@dataclass
class EvalSection:
    """What to measure after training (and, with ``baseline``, before)."""

    perplexity: dict[str, Any] = field(default_factory=dict)
    """Named perplexity sets: ``{name: source}``."""
    exact_match: dict[str, Any] = field(default_factory=dict)
    """Named generation tasks: ``{name: source of {prompt, answer} records}`` (greedy decoding)."""
    domain: list[str] = field(default_factory=list)
    """Names of the perplexity sets that are the training domain (the others are "general" in the forgetting report)."""
    baseline: bool = False
    """Also evaluate before training (for ``block_expand``/``calm``/``lora`` this is the anchor) and write a forgetting report."""
    batch_size: int = 8
    """Sequences per evaluation batch (and prompts per generation batch)."""
    seq_len: int | None = None
    """Tokens per perplexity block; default: ``data.seq_len``."""
    max_batches: int | None = None
    """Cap on batches per perplexity set."""
    max_new_tokens: int | None = None
    """Exact-match generation length; default: longest answer + 8 tokens."""
    plots: bool = True
    """Write loss / perplexity / forgetting PNGs into the output directory."""


@dataclass
class OutputSection:
    dir: str | None = None
    """Where checkpoints, metrics and ``final/`` go; default ``runs/<recipe file name>``."""


def _omegaconf_type(tp: Any) -> Any:
    """The annotation itself when OmegaConf can validate it, else ``Any`` (TrainConfig validates later)."""
    if typing.get_origin(tp) is typing.Literal:
        return str
    probe = dataclasses.make_dataclass("Probe", [("x", tp, dataclasses.field(default=MISSING))])
    try:
        OmegaConf.structured(probe)
    except Exception:  # noqa: BLE001 - anything OmegaConf rejects is validated by TrainConfig instead
        return Any
    return tp


def _train_section() -> type:
    hints = typing.get_type_hints(TrainConfig)
    fields = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in _MOVED:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp = _omegaconf_type(hints[f.name])
        if tp is not Any and default is None:
            tp = tp | None
        fields.append((f.name, tp, dataclasses.field(default=copy.deepcopy(default))))
    section = dataclasses.make_dataclass("TrainSection", fields)
    section.__doc__ = "The options of compose.train.TrainConfig (minus data.* and output.dir)."
    return section


TrainSection = _train_section()


@dataclass
class RecipeSchema:
    anchor: str | None = None
    """Hub id, local checkpoint directory, or a ``tiny:FAMILY`` test stand-in."""
    augment: Any = None
    """Augmenting model(s) for ``calm``: same forms, or a list."""
    strategy: str = MISSING
    """A registered strategy name (block_expand, calm, lora, full)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The strategy's options (see its config class)."""
    dtype: str | None = None
    """Load the base models in this dtype (bfloat16, float16, float32); default: as saved."""
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)  # type: ignore[valid-type]
    eval: EvalSection = field(default_factory=EvalSection)
    output: OutputSection = field(default_factory=OutputSection)
    stages: list[dict[str, Any]] = field(default_factory=list)
    """Partial recipes run in order, each merged over the top level (see the module docstring)."""


_SECTIONS = {"": RecipeSchema, "data": DataSection, "train": TrainSection, "eval": EvalSection, "output": OutputSection}
_STAGE_KEYS = ("name", "anchor", "augment", "strategy", "options", "dtype", "data", "train", "eval")


def _valid_keys(section: str) -> list[str]:
    cls = _SECTIONS.get(section)
    return [f.name for f in dataclasses.fields(cls)] if cls else []


def _unknown_key_message(full_key: str, where: str) -> str:
    parts = full_key.split(".")
    section, key = (".".join(parts[:-1]), parts[-1])
    section = "" if section not in _SECTIONS else section
    valid = _valid_keys(section)
    msg = f"{where}: unknown key {full_key!r}"
    if key in _MOVED and section == "train":
        msg += f" ({key} is set as {_MOVED[key]})" if _MOVED[key] else f" ({key} is not a recipe option)"
    else:
        close = difflib.get_close_matches(key, valid, n=1)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
    if valid:
        msg += f"; valid keys{' in ' + section if section else ''}: {', '.join(valid)}"
    return msg


def _merge(*configs: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(*configs)
    except (oc_errors.ConfigKeyError, oc_errors.ConfigAttributeError) as e:
        raise RecipeError(_unknown_key_message(str(e.full_key or e.key), where)) from None
    except oc_errors.ValidationError as e:
        raise RecipeError(f"{where}: {e.full_key}: {e.msg}") from None
    except oc_errors.OmegaConfBaseException as e:
        raise RecipeError(f"{where}: {getattr(e, 'full_key', None) or ''}: {e}") from None


def _to_container(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


# ---------------------------------------------------------------------------- overrides
def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise RecipeError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=2)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"override {item!r} has no key")
    try:
        # OmegaConf's YAML reading, so that 1e-3 is a float as in the recipe files
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]))["value"]
    except Exception:  # noqa: BLE001 - an unparsable value is taken as a string
        value = raw
    return key, value


def _get_path(tree: Any, key: str) -> tuple[bool, Any]:
    node = tree
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def _set_path(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = tree
    for part in parts[:-1]:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"override {key!r}: there is no list item {part!r} (the list has {len(node)})")
            node = node[int(part)]
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise RecipeError(f"override {key!r}: {part!r} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError(f"override {key!r}: there is no list item {last!r}")
        node[int(last)] = value
    else:
        node[last] = value


# ---------------------------------------------------------------------------- the recipe
@dataclass
class Stage:
    """One resolved run: a full recipe without stages, plus where it comes from."""

    name: str | None
    config: DictConfig
    chained: bool = False
    """True when the anchor is the previous stage's output (it does not exist before the run)."""

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

    @property
    def where(self) -> str:
        return str(self.path) if self.path else "recipe"

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(self.config, resolve=True)


def load_recipe(source: str | os.PathLike | dict, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe (a YAML path or a dict); no model or data is loaded.

    Raises :class:`RecipeError` naming the file and the offending key.
    """
    path = None
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {str(source)!r} does not exist")
        try:
            loaded = OmegaConf.create(path.read_text() or "{}")
        except Exception as e:  # noqa: BLE001 - YAML errors come in several types
            raise RecipeError(f"{path}: not valid YAML ({e})") from None
        raw = OmegaConf.to_container(loaded, resolve=False)
    where = str(path) if path else "recipe"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe is a mapping of sections, got {type(raw).__name__}")
    parsed = [_parse_override(o) for o in overrides]
    for key, value in parsed:
        _set_path(raw, key, value)
    if raw.get("stages") is None:
        raw["stages"] = []
    if not isinstance(raw["stages"], list):
        raise RecipeError(f"{where}: stages must be a list of partial recipes")
    config = _merge(OmegaConf.structured(RecipeSchema), raw, where=where)
    if OmegaConf.is_missing(config, "strategy"):
        raise RecipeError(f"{where}: no strategy; give one of {', '.join(sorted(STRATEGIES))}")
    if config.output.dir is None:
        config.output.dir = str(Path("runs") / (path.stem if path else "recipe"))
    recipe = Recipe(config=config, path=path, overrides=list(overrides))
    recipe.stages = _resolve_stages(recipe, raw, parsed)
    for prev, stage in zip(recipe.stages, recipe.stages[1:]):
        if stage.chained and prev.config.strategy in STRATEGIES:
            if not _writes_full_model(prev.config.strategy):
                raise RecipeError(
                    f"{where}: stage {stage.name!r} starts from stage {prev.name!r}'s output, but a "
                    f"{prev.config.strategy!r} output is not a full model; give stage {stage.name!r} an anchor"
                )
    for stage in recipe.stages:
        _validate_stage(stage, where)
    return recipe


def _writes_full_model(strategy: str) -> bool:
    return get_strategy(strategy).saves_full_model


def _resolve_stages(recipe: Recipe, raw: dict, overrides: list[tuple[str, Any]]) -> list[Stage]:
    where = recipe.where
    base_dict = {k: v for k, v in _to_container(recipe.config).items() if k != "stages"}
    raw_stages = raw.get("stages") or []
    if not raw_stages:
        return [Stage(name=None, config=_merge(OmegaConf.structured(RecipeSchema), base_dict, where=where))]
    top_overrides = [(k, v) for k, v in overrides if not k.startswith("stages.")]
    stages: list[Stage] = []
    names: set[str] = set()
    for i, st in enumerate(raw_stages):
        sw = f"{where}: stages[{i}]"
        if not isinstance(st, dict):
            raise RecipeError(f"{sw}: a stage is a mapping (a partial recipe), got {type(st).__name__}")
        unknown = sorted(set(st) - set(_STAGE_KEYS))
        if unknown:
            raise RecipeError(
                f"{sw}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(_STAGE_KEYS)}"
            )
        st = copy.deepcopy(st)
        for key, value in top_overrides:  # command-line overrides win inside stages too
            if _get_path(st, key)[0]:
                _set_path(st, key, value)
        name = str(st.pop("name", None) or f"stage{i + 1}")
        if name in names or "/" in name:
            raise RecipeError(f"{sw}: stage name {name!r} is repeated or contains '/'")
        names.add(name)
        options = st.pop("options", None)
        base = copy.deepcopy(base_dict)
        for section, key in (("", "augment"), ("data", "train"), ("data", "eval")):
            # free-form values (a source, or a list of them): a stage's value replaces the top level's
            holder, stage_holder = (base, st) if not section else (base[section], st.get(section) or {})
            if isinstance(stage_holder, dict) and key in stage_holder:
                holder[key] = None
        merged = _merge(OmegaConf.structured(RecipeSchema), base, st, where=sw)
        # ${output.dir} in a stage means the recipe's output dir, not the stage's (set below)
        OmegaConf.resolve(merged)
        if options is None:
            options = base_dict["options"] if merged.strategy == base_dict["strategy"] else {}
        merged.options = options
        chained = i > 0 and "anchor" not in st
        if chained:
            merged.anchor = str(stages[-1].output_dir / "final")
            # the previous stage saved its tokenizer beside its weights
            if "data" not in st or "tokenizer" not in (st.get("data") or {}):
                merged.data.tokenizer = None
        merged.output.dir = str(Path(base_dict["output"]["dir"]) / name)
        stages.append(Stage(name=name, config=merged, chained=chained))
    return stages


def _validate_stage(stage: Stage, where: str) -> None:
    cfg = stage.config
    sw = f"{where}" + (f" (stage {stage.name!r})" if stage.name else "")
    try:
        strategy_cls = get_strategy(cfg.strategy)
        make_config(cfg.strategy, _to_container(cfg.options))
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{sw}: {e}") from None
    try:
        train_config(cfg)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{sw}: train: {e}") from None
    if cfg.anchor is None:
        raise RecipeError(f"{sw}: no anchor model (a hub id, a local directory or tiny:FAMILY)")
    augments = _as_list(_to_container(cfg.augment))
    if strategy_cls.takes_augment and not augments:
        raise RecipeError(f"{sw}: strategy {cfg.strategy!r} needs an augmenting model (augment: ...)")
    if not strategy_cls.takes_augment and augments:
        raise RecipeError(f"{sw}: strategy {cfg.strategy!r} takes no augmenting model; remove augment")
    if cfg.dtype is not None and cfg.dtype not in ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
        raise RecipeError(f"{sw}: dtype {cfg.dtype!r} is not one of float32, bfloat16, float16")
    if not _as_list(_to_container(cfg.data.train)):
        raise RecipeError(f"{sw}: data.train is empty; give a file, a hub dataset or a list of them")
    for key in ("train", "eval"):
        for src in _as_list(_to_container(cfg.data[key])):
            _check_source(src, f"{sw}: data.{key}")
    for section in ("perplexity", "exact_match"):
        for name, src in _to_container(cfg.eval[section]).items():
            _check_source(src, f"{sw}: eval.{section}.{name}")
    unknown_domain = sorted(set(cfg.eval.domain) - set(cfg.eval.perplexity))
    if unknown_domain:
        raise RecipeError(f"{sw}: eval.domain names {unknown_domain} that are not eval.perplexity sets")


def train_config(cfg: DictConfig) -> TrainConfig:
    """The :class:`TrainConfig` of a resolved stage config (data options and output dir folded in)."""
    options = _to_container(cfg.train)
    options.update({k: cfg.data[k] for k in _DATA_KEYS})
    options["output_dir"] = cfg.output.dir
    options["save_final"] = True
    if isinstance(options.get("adam_betas"), list):
        options["adam_betas"] = tuple(options["adam_betas"])
    return TrainConfig.from_kwargs(**options)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _looks_local(s: str) -> bool:
    return (
        s.startswith((".", "/", "~"))
        or s.count("/") > 1
        or Path(s).suffix.lower()
        in (
            ".txt",
            ".jsonl",
            ".json",
            ".parquet",
        )
    )


def _check_source(src: Any, where: str) -> None:
    if isinstance(src, dict):
        unknown = sorted(set(src) - set(_SOURCE_KEYS))
        if unknown:
            raise RecipeError(
                f"{where}: unknown key(s) {unknown} in a data source; valid keys: {', '.join(_SOURCE_KEYS)}"
            )
        if "path" not in src:
            raise RecipeError(f"{where}: a data source mapping needs 'path'")
        if not isinstance(src.get("columns") or {}, dict):
            raise RecipeError(f"{where}: columns must be a mapping {{old_name: new_name}}")
        weight = src.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or weight <= 0:
            raise RecipeError(f"{where}: weight must be a positive number, got {weight!r}")
        src = src["path"]
    if not isinstance(src, str):
        raise RecipeError(f"{where}: a data source is a path, a hub dataset name or a mapping, got {src!r}")
    if _looks_local(src) and not Path(src).expanduser().exists():
        raise RecipeError(f"{where}: data file {src!r} does not exist")


def _check_model(src: str, where: str, produced: str | None = None) -> None:
    if src.startswith(TINY_PREFIX):
        _parse_tiny(src)
    elif produced is not None and _inside(src, produced):
        return  # written by an earlier stage of this recipe
    elif _looks_local(src) and not Path(src).expanduser().is_dir():
        raise RecipeError(f"{where}: model directory {src!r} does not exist")


def _inside(path: str, root: str) -> bool:
    p, r = Path(path).expanduser().resolve(), Path(root).expanduser().resolve()
    return p == r or r in p.parents


# ---------------------------------------------------------------------------- check
def check_recipe(source: str | os.PathLike | dict, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Validate a recipe fully without loading weights or downloading anything.

    Checks the schema, every stage's strategy and options, the training options, and that
    local paths (models, tokenizers, data files) exist. Hub ids are not looked up.
    """
    recipe = load_recipe(source, overrides)
    for stage in recipe.stages:
        cfg = stage.config
        sw = recipe.where + (f" (stage {stage.name!r})" if stage.name else "")
        try:
            # models under output.dir are written by earlier stages (later stages only)
            produced = recipe.config.output.dir if stage is not recipe.stages[0] else None
            if not stage.chained:
                _check_model(cfg.anchor, f"{sw}: anchor", produced)
            for a in _as_list(_to_container(cfg.augment)):
                _check_model(str(a), f"{sw}: augment", produced)
            if cfg.data.tokenizer and _looks_local(cfg.data.tokenizer):
                if not Path(cfg.data.tokenizer).expanduser().exists():
                    raise RecipeError(f"{sw}: data.tokenizer {cfg.data.tokenizer!r} does not exist")
        except ValueError as e:
            raise RecipeError(str(e)) from None
    return recipe


# ---------------------------------------------------------------------------- tiny stand-ins
def _parse_tiny(spec: str) -> tuple[str, dict[str, Any]]:
    from .testing import TINY_FAMILIES

    body = spec[len(TINY_PREFIX) :]
    family, _, query = body.partition("?")
    if family not in TINY_FAMILIES:
        raise RecipeError(f"{spec!r}: unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    kwargs: dict[str, Any] = {}
    allowed = ("seed", "hidden", "layers", "heads", "kv_heads", "positions", "tie")
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key not in allowed:
            raise RecipeError(f"{spec!r}: unknown tiny option {key!r}; valid: {', '.join(allowed)}")
        kwargs[key] = value.lower() in ("1", "true", "yes") if key == "tie" else int(value)
    return family, kwargs


def resolve_model(source: str, *, dtype: str | None = None):
    """A ``tiny:FAMILY?...`` spec becomes a tiny random model; anything else is returned as is."""
    if not isinstance(source, str) or not source.startswith(TINY_PREFIX):
        return source
    from .testing import tiny_model

    family, kwargs = _parse_tiny(source)
    model = tiny_model(family, **kwargs)
    # recorded in compose.json, so that load_output can rebuild the stand-in
    model.config._name_or_path = source
    if dtype is not None:
        from .composer import _as_dtype

        model = model.to(dtype=_as_dtype(dtype))
    return model


def load_output(directory: str | os.PathLike, **kwargs: Any):
    """``Composer.load(directory)``, rebuilding ``tiny:`` stand-in base models recorded in ``compose.json``."""
    from .composer import CONFIG_NAME, Composer
    from .io import read_json

    meta_path = Path(directory) / CONFIG_NAME
    if meta_path.is_file():
        meta = read_json(meta_path)
        anchor = meta.get("anchor")
        if kwargs.get("anchor") is None and isinstance(anchor, str) and anchor.startswith(TINY_PREFIX):
            kwargs["anchor"] = resolve_model(anchor)
        augments = meta.get("augment") or []
        if kwargs.get("augment") is None and any(isinstance(a, str) and a.startswith(TINY_PREFIX) for a in augments):
            kwargs["augment"] = [resolve_model(a) for a in augments]
    return Composer.load(directory, **kwargs)


# ---------------------------------------------------------------------------- run
from .data import _is_main_process, _load_source, build_data  # noqa: E402,F401 - re-exported for callers


def _build_composer(cfg: DictConfig):
    from .composer import Composer

    augments = [resolve_model(str(a), dtype=cfg.dtype) for a in _as_list(_to_container(cfg.augment))]
    anchor = resolve_model(cfg.anchor, dtype=cfg.dtype)
    tokenizer = cfg.data.tokenizer
    if tokenizer is None and isinstance(cfg.anchor, str) and cfg.anchor.startswith(TINY_PREFIX):
        tokenizer = tiny_tokenizer()
    return Composer(
        anchor,
        augments if len(augments) > 1 else (augments[0] if augments else None),
        strategy=cfg.strategy,
        tokenizer=tokenizer,
        copy_model=False,
        dtype=cfg.dtype,
        **_to_container(cfg.options),
    )


def _evaluate(composer, cfg: DictConfig) -> dict[str, Any]:
    from .evaluate import exact_match, perplexity_report

    ev = cfg.eval
    seq_len = ev.seq_len or cfg.data.seq_len
    sets = {name: build_data(src, composer, cfg, seq_len) for name, src in _to_container(ev.perplexity).items()}
    out: dict[str, Any] = {
        "perplexity": perplexity_report(composer, sets, batch_size=ev.batch_size, max_batches=ev.max_batches)
    }
    if ev.exact_match:
        out["exact_match"] = {}
        for name, src in _to_container(ev.exact_match).items():
            records, _ = _load_source(src, cfg.data.text_field)
            res = exact_match(composer, records, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)
            out["exact_match"][name] = {k: v for k, v in res.items() if k != "predictions"}
    return out


def run_recipe(recipe: Recipe | str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), *, log=print) -> dict:
    """Run every stage: build the Composer, fit, evaluate the named sets, save.

    Each stage writes ``<dir>/final`` (the model, as ``Composer.save`` writes it) with a
    copy of the resolved recipe (``recipe.yaml``) and ``results.json`` beside the weights.
    Returns ``{stage name: {"output", "history", "eval", "baseline", "forgetting"}}``
    (a single-stage recipe's stage is named ``"main"``).
    """
    from .evaluate import forgetting_report, format_table, plot_forgetting, plot_history, plot_perplexity
    from .io import write_json

    if not isinstance(recipe, Recipe):
        recipe = check_recipe(recipe, overrides)
    main = _is_main_process()
    say = log if main else (lambda *a, **k: None)
    results: dict[str, Any] = {}
    for stage in recipe.stages:
        cfg = stage.config
        name = stage.name or "main"
        tc = train_config(cfg)
        say(f"compose: stage {name}: {cfg.strategy} on {cfg.anchor} -> {tc.output_dir}")
        composer = _build_composer(cfg)
        say(f"compose: {composer!r}")
        baseline = _evaluate(composer, cfg) if cfg.eval.baseline and cfg.eval.perplexity else None
        train_blocks = build_data(cfg.data.train, composer, cfg, seed=tc.seed)
        eval_blocks = build_data(cfg.data.eval, composer, cfg) if cfg.data.eval else None
        options = {f.name: getattr(tc, f.name) for f in dataclasses.fields(tc)}
        composer.fit(train_blocks, eval_blocks, **options)
        evaluation = _evaluate(composer, cfg) if (cfg.eval.perplexity or cfg.eval.exact_match) else {}
        result: dict[str, Any] = {
            "output": str(Path(tc.output_dir) / "final"),
            "history": composer.history,
            "eval": evaluation,
        }
        if baseline is not None:
            result["baseline"] = baseline
            result["forgetting"] = forgetting_report(
                baseline["perplexity"], evaluation["perplexity"], domain=cfg.eval.domain
            )
        if main:
            final = Path(tc.output_dir) / "final"
            (final / RECIPE_FILE).write_text(recipe.to_yaml())
            write_json(final / "results.json", {k: v for k, v in result.items() if k != "history"})
            if cfg.eval.plots:
                plot_history(composer.history, Path(tc.output_dir) / "loss.png", title=name)
                if evaluation.get("perplexity"):
                    reports = {"after": evaluation["perplexity"]}
                    if baseline is not None:
                        reports = {"before": baseline["perplexity"], **reports}
                    plot_perplexity(reports, Path(tc.output_dir) / "perplexity.png", title=name)
                if result.get("forgetting"):
                    plot_forgetting(result["forgetting"], Path(tc.output_dir) / "forgetting.png", title=name)
            for set_name, rep in evaluation.get("perplexity", {}).items():
                say(f"compose: {name}: perplexity {set_name} = {rep['perplexity']:.3f}")
            for task, rep in evaluation.get("exact_match", {}).items():
                say(f"compose: {name}: exact match {task} = {rep['accuracy']:.3f} ({rep['correct']}/{rep['total']})")
            if result.get("forgetting"):
                say(format_table(result["forgetting"]))
        results[name] = result
        del composer
    if main and len(recipe.stages) > 1:
        Path(recipe.config.output.dir).mkdir(parents=True, exist_ok=True)
        (Path(recipe.config.output.dir) / RECIPE_FILE).write_text(recipe.to_yaml())
    return results
