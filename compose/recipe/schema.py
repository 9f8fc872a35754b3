"""The recipe schema: sections as dataclasses, their typed validation, and ``train_config``.

Keys are checked by OmegaConf (a structured config, so a misspelt key is an error naming
it); values are checked by :mod:`compose.validation`, the same layer the API uses, so a
recipe accepts exactly what ``Composer``/``fit`` accept (``packing: "no"`` and
``learning_rate: "1e-3"`` are errors, not silently converted). The ``train`` section is
generated from :class:`compose.train.TrainConfig`, so the two cannot drift.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from ..rules import OptionError, option, validate_options
from ..train import TrainConfig

__all__ = [
    "RecipeError",
    "RecipeSchema",
    "DataSection",
    "TrainSection",
    "EvalSection",
    "LmEvalSection",
    "OutputSection",
    "train_config",
    "validate_sections",
]

# TrainConfig fields that belong to other sections (or are not recipe material).
DATA_KEYS = ("seq_len", "packing", "mask_prompt", "text_field", "packing_attention", "chat_template")
MOVED = {**{k: f"data.{k}" for k in DATA_KEYS}, "output_dir": "output.dir", "save_final": None, "callbacks": None}
SOURCE_KEYS = ("path", "name", "data_dir", "split", "columns", "weight", "max_records")
SECTION_KEYS = ("data", "train", "eval", "output")


class RecipeError(ValueError):
    """A recipe that does not validate; the message names the recipe file and the key."""


def _train_default(name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


@dataclass
class DataSection:
    """What to train on."""

    train: Any = option(
        None,
        help=(
            "A source or a list of sources: a local .txt/.jsonl/.parquet file, a hub dataset name, or a mapping "
            "``{path, name, data_dir, split, columns, weight, max_records}``: ``name``/``data_dir``/``split`` go to"
            " ``datasets.load_dataset``, ``columns`` renames fields (``{content: text}``), ``weight`` repeats a "
            "source's blocks (1.5 = all once, half of them twice), ``max_records`` keeps the first N records."
        ),
    )
    eval: Any = option(None, help="Held-out source(s) whose loss is logged during training (``eval_loss``).")
    tokenizer: str | None = option(None, help="Tokenizer path or hub id; default: the one beside the anchor.")
    augment_tokenizer: Any = option(
        None,
        help=(
            "``calm`` only: the augmenting model's own tokenizer (path or hub id; a list with several augments). "
            "The augment then reads the text with it, aligned by characters; default: same-vocabulary composition."
        ),
    )
    seq_len: int = _train_default("seq_len")
    packing: bool = _train_default("packing")
    mask_prompt: bool = _train_default("mask_prompt")
    text_field: str = _train_default("text_field")
    packing_attention: str = _train_default("packing_attention")
    chat_template: str | None = _train_default("chat_template")


@dataclass
class LmEvalSection:
    """lm-evaluation-harness tasks run on the trained model (``compose.evaluate.lm_eval``)."""

    tasks: list[str] = option(default_factory=list, help="Task names, e.g. ``[hellaswag, arc_easy]``.")
    num_fewshot: int | None = option(None, ge=0, help="Examples in the prompt; default: each task's own.")
    limit: int | None = option(None, ge=1, help="Cap on examples per task (a quick look, not a score to report).")
    batch_size: int = option(8, ge=1, help="Sequences per batch.")


@dataclass
class EvalSection:
    """What to measure after training (and, with ``baseline``, before)."""

    perplexity: dict[str, Any] = option(default_factory=dict, help="Named perplexity sets: ``{name: source}``.")
    exact_match: dict[str, Any] = option(
        default_factory=dict,
        help="Named generation tasks: ``{name: source of {prompt, answer} records}`` (greedy decoding).",
    )
    domain: list[str] = option(
        default_factory=list,
        help=(
            'Names of the perplexity sets that are the training domain (the others are "general" in the forgetting '
            "report)."
        ),
    )
    baseline: bool = option(
        False,
        help=(
            "Also evaluate before training (for ``block_expand``/``calm``/``lora`` this is the anchor) and write a "
            "forgetting report."
        ),
    )
    batch_size: int = option(8, ge=1, help="Sequences per evaluation batch (and prompts per generation batch).")
    seq_len: int | None = option(None, ge=2, help="Tokens per perplexity block; default: ``data.seq_len``.")
    max_batches: int | None = option(None, ge=1, help="Cap on batches per perplexity set.")
    max_new_tokens: int | None = option(
        None, ge=1, help="Exact-match generation length; default: longest answer + 8 tokens."
    )
    plots: bool = option(True, help="Write loss / perplexity / forgetting PNGs into the output directory.")
    lm_eval: LmEvalSection | None = option(
        None, help="lm-evaluation-harness tasks: ``{tasks: [...], num_fewshot, limit, batch_size}``."
    )


@dataclass
class OutputSection:
    dir: str | None = option(
        None, help="Where checkpoints, metrics and ``final/`` go; default ``runs/<recipe file name>``."
    )


def _train_section() -> type:
    fields = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in MOVED:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        fields.append((f.name, f.type, dataclasses.field(default=copy.deepcopy(default))))
    section = dataclasses.make_dataclass("TrainSection", fields)
    section.__doc__ = "The options of compose.train.TrainConfig (minus data.* and output.dir)."
    return section


TrainSection = _train_section()


@dataclass
class RecipeSchema:
    anchor: str | None = option(None, help="Hub id, local checkpoint directory, or a ``tiny:FAMILY`` test stand-in.")
    augment: Any = option(None, help="Augmenting model(s) for ``calm``: same forms, or a list.")
    strategy: str = option(MISSING, help="A registered strategy name (``compose.STRATEGIES``).")
    options: dict[str, Any] = option(
        default_factory=dict, help="The strategy's options (docs/strategies.md); each strategy's, with their ranges:"
    )
    dtype: str | None = option(
        None, help="Load the base models in this dtype (bfloat16, float16, float32); default: as saved."
    )
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)  # type: ignore[valid-type]
    eval: EvalSection = field(default_factory=EvalSection)
    output: OutputSection = field(default_factory=OutputSection)
    stages: list[dict[str, Any]] = option(
        default_factory=list,
        help="Partial recipes run in order, each merged over the top level (see the package docstring).",
    )


SECTIONS = {"": RecipeSchema, "data": DataSection, "train": TrainSection, "eval": EvalSection, "output": OutputSection}
STAGE_KEYS = ("name", "anchor", "augment", "strategy", "options", "dtype", "data", "train", "eval")


# ---------------------------------------------------------------------------- keys (OmegaConf)
def _untyped(cls: type) -> type:
    """A mirror of ``cls`` with every leaf typed ``Any``: OmegaConf checks the keys, not the values."""
    fields = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            sub = _untyped(type(default))
            fields.append((f.name, sub, dataclasses.field(default_factory=sub)))
        elif isinstance(default, (dict, list)):
            fields.append((f.name, Any, dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d))))
        else:
            fields.append((f.name, Any, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"Untyped{cls.__name__}", fields)


_KEYS_SCHEMA = _untyped(RecipeSchema)


def keys_schema() -> DictConfig:
    return OmegaConf.structured(_KEYS_SCHEMA)


def valid_keys(section: str) -> list[str]:
    cls = SECTIONS.get(section)
    return [f.name for f in dataclasses.fields(cls)] if cls else []


def unknown_key_message(full_key: str, where: str) -> str:
    parts = full_key.split(".")
    section, key = (".".join(parts[:-1]), parts[-1])
    section = "" if section not in SECTIONS else section
    valid = valid_keys(section)
    msg = f"{where}: unknown key {full_key!r}"
    if key in MOVED and section == "train":
        msg += f" ({key} is set as {MOVED[key]})" if MOVED[key] else f" ({key} is not a recipe option)"
    else:
        close = difflib.get_close_matches(key, valid, n=1)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
    if valid:
        msg += f"; valid keys{' in ' + section if section else ''}: {', '.join(valid)}"
    return msg


def merge(*configs: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(*configs)
    except (oc_errors.ConfigKeyError, oc_errors.ConfigAttributeError) as e:
        raise RecipeError(unknown_key_message(str(e.full_key or e.key), where)) from None
    except oc_errors.OmegaConfBaseException as e:
        raise RecipeError(f"{where}: {getattr(e, 'full_key', None) or 'recipe'}: {e.msg or e}") from None


def check_section_shapes(raw: dict, where: str) -> None:
    """``train: 5`` and the like: a section must be a mapping (an empty one may be left out)."""
    for key in (*SECTION_KEYS, "options"):
        if key in raw and raw[key] is None:
            del raw[key]
        elif key in raw and not isinstance(raw[key], dict):
            raise RecipeError(
                f"{where}: section {key!r} must be a mapping of options (e.g. {key}: {{...}}), got {raw[key]!r}"
            )


# ---------------------------------------------------------------------------- values (typed layer)
def to_container(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


_to_container = to_container


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check(cls: type, values: dict, where: str, section: str) -> dict:
    try:
        return validate_options(cls, values, what="key", owner=f" in {section}")
    except OptionError as e:
        raise RecipeError(f"{where}: {section}: {e}") from None


def validate_sections(cfg: DictConfig, where: str) -> TrainConfig:
    """Types and ranges of every value of a resolved (stage) config, each section checked once by its
    dataclass; returns the stage's :class:`TrainConfig` (``train`` with the data options folded in)."""
    top = {k: to_container(cfg[k]) for k in ("anchor", "strategy", "dtype")}
    _check(RecipeSchema, top, where, "recipe")
    data = to_container(cfg.data)
    _check(DataSection, {k: data[k] for k in ("tokenizer", "augment_tokenizer")}, where, "data")
    _check(OutputSection, to_container(cfg.output), where, "output")
    ev = to_container(cfg.eval)
    lm = ev.pop("lm_eval", None)
    _check(EvalSection, ev, where, "eval")
    if lm is not None:
        if not isinstance(lm, dict):
            raise RecipeError(f"{where}: eval.lm_eval must be a mapping {{tasks, num_fewshot, limit, batch_size}}")
        lm = _check(LmEvalSection, lm, where, "eval.lm_eval")
        if not lm.get("tasks"):
            raise RecipeError(f"{where}: eval.lm_eval.tasks is empty; name at least one task (e.g. [hellaswag])")
        cfg.eval.lm_eval = dataclasses.asdict(LmEvalSection(**lm))  # defaults filled in
    return train_config(cfg, where)


def train_config(cfg: DictConfig, where: str = "recipe") -> TrainConfig:
    """The :class:`TrainConfig` of a resolved stage config (data options and output dir folded in).

    Built once, so checked once; an error names the section the option is written in (``data``
    or ``train``).
    """
    options = to_container(cfg.train)
    options.update({k: to_container(cfg.data[k]) for k in DATA_KEYS})
    options["output_dir"] = cfg.output.dir
    options["save_final"] = True
    try:
        return TrainConfig(**options)
    except OptionError as e:
        section = "data" if getattr(e, "option", None) in DATA_KEYS else "train"
        raise RecipeError(f"{where}: {section}: {e}") from None
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where}: train: {e}") from None
