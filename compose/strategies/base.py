"""The strategy interface and its registry.

A strategy is a config dataclass plus a class, registered in one line::

    @register
    class BlockExpand(Strategy):
        name = "block_expand"
        config_class = BlockExpandConfig

A strategy only *builds* (turns frozen base model(s) into a composed module with the
right parameters trainable) and *saves/loads* what it built. Loading models, data,
training and evaluation are the :class:`~compose.Composer`'s job.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from torch import nn
from transformers import PreTrainedModel

__all__ = ["StrategyConfig", "Strategy", "STRATEGIES", "register", "get_strategy", "make_config", "shard_options"]


@dataclasses.dataclass
class StrategyConfig:
    """Base class of strategy options. Subclasses validate in ``__post_init__``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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

    def __init__(self, config: StrategyConfig):
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config

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
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


def make_config(name: str, options: dict[str, Any]) -> StrategyConfig:
    """Build ``name``'s config from keyword options, checked by :mod:`compose.validation` first.

    An unknown option, a value of the wrong type (``"no"`` for a bool, ``1.7`` for an index)
    or out of range is an ``OptionError`` (a ``ValueError``) naming it and what is accepted.
    """
    from ..validation import validate_strategy_options

    return get_strategy(name).config_class(**validate_strategy_options(name, options))
