"""The strategy interface and its registry.

A strategy is a config dataclass plus a class, registered in one line::

    @register
    class BlockExpand(Strategy):
        name = "block_expand"
        paper = "https://arxiv.org/abs/2401.02415"
        config_class = BlockExpandConfig

A strategy carries everything compose needs to know about it: its ``name``, ``paper``,
options (the config dataclass, ranges declared next to the fields with
:func:`compose.rules.option`), the checks it makes on the anchor's config before anything
is built (:meth:`Strategy.check`), whether it reads text with its own tokenizers
(:meth:`Strategy.set_tokenizers`), and any saved format of its own besides
``Composer.save``'s (:meth:`Strategy.is_pretrained_dir` / :meth:`Strategy.load_pretrained`).
The CLI, the recipe schema, ``compose check`` and the docs' strategy table ask
:data:`STRATEGIES`.

A strategy only *builds* (turns frozen base model(s) into a composed module with the
right parameters trainable) and *saves/loads* what it built. Loading models, data,
training and evaluation are the :class:`~compose.Composer`'s job.

>>> from compose.strategies import STRATEGIES
>>> sorted(STRATEGIES)
['block_expand', 'calm', 'full', 'lora']
>>> make_config("lora", {"r": 0})
Traceback (most recent call last):
    ...
compose.rules.OptionError: r=0 is not accepted; expected an integer >= 1
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from torch import nn
from transformers import PreTrainedModel

from ..rules import check_field, check_names, rules_of, validate_fields

__all__ = [
    "StrategyConfig",
    "Strategy",
    "Pretrained",
    "STRATEGIES",
    "register",
    "unregister",
    "get_strategy",
    "make_config",
    "strategy_of",
    "shard_options",
    "strategy_table",
    "option_summary",
]


@dataclasses.dataclass
class StrategyConfig:
    """Base class of strategy options.

    Building one checks every field once, against its annotation and the range declared
    beside it (``r: int = option(8, ge=1)``); a subclass adds the checks that relate fields
    (or need more than a type and a range) in ``__post_init__`` after calling this one.
    """

    _checked: ClassVar[bool] = False  # set on the instance once __post_init__ has checked every field

    def __post_init__(self) -> None:
        validate_fields(self)
        object.__setattr__(self, "_checked", True)

    def __setattr__(self, name: str, value: Any) -> None:
        # a field set after construction is checked where it is set, so the object stays valid as it travels
        if self._checked and name in self.__dataclass_fields__:
            value = check_field(type(self), name, value)
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Pretrained:
    """What :meth:`Strategy.load_pretrained` rebuilds from a directory in a strategy's own format."""

    strategy: Strategy
    model: nn.Module
    anchor_source: str | None
    augment_sources: list[str | None]


class Strategy(ABC):
    """Builds a composed model from frozen base models; saves and reloads it."""

    name: ClassVar[str]
    config_class: ClassVar[type[StrategyConfig]]
    #: whether the strategy needs augmenting model(s) (``calm``) or takes none.
    takes_augment: ClassVar[bool] = False
    #: whether :meth:`save` writes the whole model as a plain transformers checkpoint, so that
    #: :meth:`load` needs no anchor and the output can seed a later stage.
    saves_full_model: ClassVar[bool] = False
    #: the method's name and paper, for model cards (``compose.publish``).
    method: ClassVar[str] = ""
    paper: ClassVar[str | None] = None
    #: the library that loads what :meth:`save` writes (the ``library_name`` of a model card).
    library_name: ClassVar[str] = "transformers"
    #: one line each for the docs' strategy table (``docs/strategies.md``): what the strategy adds to
    #: the anchor, what trains, what :meth:`save` writes.
    adds: ClassVar[str] = ""
    trains: ClassVar[str] = ""
    saves: ClassVar[str] = ""
    #: whether :meth:`set_tokenizers` matters: the strategy reads text with tokenizers of its own
    #: (``calm`` across vocabularies), so ``augment_tokenizer=`` is accepted.
    needs_tokenizers: ClassVar[bool] = False
    #: whether :meth:`build` reads weight values (a fingerprint, a measurement): then it cannot run on
    #: the ``meta`` device, and ``compose check`` notes that the stage is not counted instead of failing.
    build_reads_weights: ClassVar[bool] = False

    def __init__(self, config: StrategyConfig):
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config

    def check(self, model_config: Any) -> None:
        """Checks of the options against the anchor's config, run before anything is built (so before
        memory grows): raise ``ValueError`` naming the option. Default: none."""
        return None

    def set_tokenizers(self, tokenizer: Any, augment_tokenizers: list[Any] | None) -> None:
        """The anchor's tokenizer and one (or ``None``) per augmenting model, before :meth:`build`.

        Only strategies with ``needs_tokenizers = True`` are given them; the default ignores them.
        """
        return None

    def check_data(self, model: nn.Module, data: Any, name: str) -> None:
        """Checks of training/eval data that depend on the built model, before training. Default: none."""
        return None

    @classmethod
    def is_pretrained_dir(cls, directory: Path) -> bool:
        """Whether ``directory`` holds this strategy's own saved format (not ``Composer.save``'s)."""
        return False

    @classmethod
    def load_pretrained(cls, directory: Path, anchor: Any, augments: list[Any] | None, dtype: Any) -> Pretrained:
        """Rebuild from a directory for which :meth:`is_pretrained_dir` holds; ``anchor``/``augments``
        (models or sources, ``None`` for the recorded ones) and ``dtype`` (a ``torch.dtype`` or ``None``)."""
        raise NotImplementedError(f"strategy {cls.name!r} has no saved format of its own")

    @abstractmethod
    def build(self, anchor: PreTrainedModel, augments: list[PreTrainedModel]) -> nn.Module:
        """Return the composed model. ``anchor``/``augments`` are owned by compose and may be modified.

        Parameters that should train have ``requires_grad=True``; every other parameter
        ``requires_grad=False``. The returned module's ``forward(input_ids, attention_mask,
        labels)`` returns an output with ``.loss`` and ``.logits``.
        """

    @abstractmethod
    def save(self, model: nn.Module, directory: Path, *, max_shard_size: int | str | None = None) -> dict[str, Any]:
        """Write the strategy's weights into ``directory``; return extra JSON state for ``compose.json``.

        ``max_shard_size`` (``"5GB"``, bytes) splits full-model weights into safetensors shards
        with an index; strategies that write only a few small tensors (an adapter, CALM's
        connections) write one file.
        """

    @abstractmethod
    def load(
        self,
        directory: Path,
        state: dict[str, Any],
        anchor: PreTrainedModel | None,
        augments: list[PreTrainedModel],
    ) -> nn.Module:
        """Rebuild the composed model from a directory written by :meth:`save`.

        ``anchor`` is ``None`` when the directory holds the full model (``block_expand``).
        """

    def export(self, model: nn.Module, directory: Path, *, max_shard_size: int | str | None = None) -> None:
        """Write ``model`` as a plain transformers checkpoint (``compose export``).

        Strategies that already hold a plain model save it; others override this (``lora``
        merges its adapters) or cannot be exported (``calm``).
        """
        if not self.saves_full_model:
            raise ValueError(
                f"strategy {self.name!r} has no plain-checkpoint export: its model is not a single "
                "transformers model (load it with Composer.load instead)"
            )
        model.save_pretrained(directory, safe_serialization=True, **shard_options(max_shard_size))


def shard_options(max_shard_size: int | str | None) -> dict[str, Any]:
    """``save_pretrained`` keywords for ``max_shard_size`` (none: transformers' default, one file up to 50GB)."""
    return {} if max_shard_size is None else {"max_shard_size": max_shard_size}


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator adding a strategy to :data:`STRATEGIES` under ``cls.name``."""
    if cls.name in STRATEGIES and STRATEGIES[cls.name] is not cls:
        raise ValueError(f"strategy {cls.name!r} is registered twice")
    if not (isinstance(cls.config_class, type) and issubclass(cls.config_class, StrategyConfig)):
        raise TypeError(f"strategy {cls.name!r}: config_class must be a StrategyConfig dataclass")
    STRATEGIES[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a strategy added with :func:`register` (tests, plugins that are unloaded)."""
    STRATEGIES.pop(name, None)


def get_strategy(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


def make_config(name: str, options: dict[str, Any]) -> StrategyConfig:
    """Build ``name``'s config from keyword options; the config checks their types and ranges once.

    An unknown option, a value of the wrong type (``"no"`` for a bool, ``1.7`` for an index)
    or out of range is an ``OptionError`` (a ``ValueError``) naming it and what is accepted.
    """
    config_class = get_strategy(name).config_class
    check_names(config_class, options, what="option", owner=f" for strategy {name!r}")
    return config_class(**options)


def strategy_of(config: StrategyConfig) -> type[Strategy]:
    """The registered strategy whose ``config_class`` is ``type(config)``."""
    for cls in STRATEGIES.values():
        if type(config) is cls.config_class:
            return cls
    raise ValueError(f"{type(config).__name__} belongs to no registered strategy")


def option_summary(config_class: type, quote: str = "") -> str:
    """A strategy's options with their ranges, e.g. ``r (>= 1), alpha (> 0), dropout (>= 0 and < 1)``."""
    rules = rules_of(config_class)
    return ", ".join(
        f"{quote}{f.name}{quote}" + (f" ({rules[f.name].describe()})" if f.name in rules else "")
        for f in dataclasses.fields(config_class)
        if f.init
    )


def strategy_table() -> str:
    """The docs' strategy table (``docs/strategies.md``), one row per registered strategy."""
    rows = [
        "| strategy | method | paper | adds | trains | saves | options |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(STRATEGIES):
        cls = STRATEGIES[name]
        options = option_summary(cls.config_class, quote="`")
        paper = cls.paper or "-"
        rows.append(
            f"| `{name}` | {cls.method or name} | {paper} | {cls.adds} | {cls.trains} | {cls.saves} | {options} |"
        )
    return "\n".join(rows) + "\n"
