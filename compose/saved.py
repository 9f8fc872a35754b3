"""Reading a saved Composer back: ``compose.json`` and the strategy's weights, or a strategy's own format.

:meth:`compose.Composer.load` is :func:`load_composer`. A directory with ``compose.json``
(written by ``Composer.save``) names its strategy, options and saved state; a directory
without one is offered to every registered strategy (:meth:`Strategy.is_pretrained_dir`),
so a strategy with a format of its own (``calm``'s ``save_pretrained``) loads it itself.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from .datachecks import check_tokenizer_vocabulary
from .io import check_safetensors, read_json, recover_directory
from .loading import as_dtype, load_model, resolve_tokenizer
from .strategies import STRATEGIES, get_strategy, make_config

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "load_composer"]

CONFIG_NAME = "compose.json"
FORMAT_VERSION = 1


def _check_meta(path: Path, meta: Any) -> None:
    """``compose.json`` must be an object naming the strategy, its options and its saved state."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds a JSON {type(meta).__name__}, not the object Composer.save writes")
    expected = {"strategy": str, "options": dict, "state": dict}
    for key, kind in expected.items():
        if not isinstance(meta.get(key), kind):
            found = "is missing" if key not in meta else f"is {meta[key]!r:.40}"
            raise ValueError(
                f"{path}: {key!r} {found}; expected a {kind.__name__}. The file was edited or damaged: restore "
                "it as Composer.save wrote it"
            )


def _read_meta(meta_path: Path) -> dict[str, Any]:
    meta = read_json(meta_path)
    _check_meta(meta_path, meta)
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format {meta.get('format')!r}; this compose reads {FORMAT_VERSION}")
    return meta


def load_composer(
    cls: type,
    directory: str | os.PathLike,
    *,
    anchor: Any = None,
    augment: Any = None,
    tokenizer: Any = None,
    copy_model: bool = True,
    dtype: Any = None,
) -> Any:
    """A ``cls`` (a :class:`~compose.Composer`) rebuilt from ``directory``; see :meth:`Composer.load`."""
    directory = Path(directory)
    meta_path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist or is not a directory")
    recover_directory(directory)
    for weights in sorted(directory.glob("*.safetensors")):
        check_safetensors(weights)
    if not meta_path.is_file():
        for strategy_cls in STRATEGIES.values():
            if strategy_cls.is_pretrained_dir(directory):
                return _load_pretrained(cls, strategy_cls, directory, anchor, augment, tokenizer, dtype, copy_model)
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}: it was not written by Composer.save")
    meta = _read_meta(meta_path)
    self = cls.__new__(cls)
    self.strategy_name = meta["strategy"]
    self.strategy = get_strategy(self.strategy_name)(make_config(self.strategy_name, meta["options"]))
    self.history = []
    self.data_names = list(meta.get("data") or [])
    anchor_model, augments = _load_bases(self, meta, meta_path, anchor, augment, copy_model, dtype)
    if self.strategy.saves_full_model and not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory} has no config.json: the saved model is incomplete (deleted or not copied); "
            "save it again, or copy the whole directory"
        )
    self.model = self.strategy.load(directory, meta.get("state", {}), anchor_model, augments)
    if dtype is not None and anchor_model is None:
        self.model.to(dtype=as_dtype(dtype))
    if anchor_model is not None:
        self._base_configs = [anchor_model.config] + [m.config for m in augments]
    self.model.eval()
    self.tokenizer = resolve_tokenizer(tokenizer, [str(directory), self.anchor_source])
    check_tokenizer_vocabulary(self.tokenizer, self.model)
    return self


def _load_bases(self: Any, meta: dict, meta_path: Path, anchor: Any, augment: Any, copy_model: bool, dtype: Any):
    """The base models a strategy that saves only what it trained needs (none for a full model)."""
    if self.strategy.saves_full_model:
        self.anchor_source, self.augment_sources = meta.get("anchor"), []
        return None, []
    anchor_src = anchor if anchor is not None else meta.get("anchor")
    if anchor_src is None:
        raise ValueError(f"{meta_path} names no anchor model; pass anchor= to Composer.load")
    anchor_model, self.anchor_source = load_model(anchor_src, copy_model=copy_model, dtype=dtype)
    aug_srcs = augment if augment is not None else meta.get("augment") or []
    aug_srcs = list(aug_srcs) if isinstance(aug_srcs, (list, tuple)) else [aug_srcs]
    if any(a is None for a in aug_srcs):
        raise ValueError(f"{meta_path} does not name every augmenting model; pass augment= to Composer.load")
    loaded = [load_model(a, copy_model=copy_model, dtype=dtype) for a in aug_srcs]
    self.augment_sources = [s for _, s in loaded]
    return anchor_model, [m for m, _ in loaded]


def _load_pretrained(
    cls: type,
    strategy_cls: Any,
    directory: Path,
    anchor: Any,
    augment: Any,
    tokenizer: Any,
    dtype: Any,
    copy_model: bool,
) -> Any:
    """A Composer around a directory in the strategy's own format (``calm``: ``save_pretrained``)."""

    def own(m):  # the caller's model objects are never mutated unless copy_model=False
        return copy.deepcopy(m) if copy_model and isinstance(m, PreTrainedModel) else m

    augments = None if augment is None else list(augment) if isinstance(augment, (list, tuple)) else [augment]
    anchor, augments = own(anchor), None if augments is None else [own(a) for a in augments]
    loaded = strategy_cls.load_pretrained(directory, anchor, augments, as_dtype(dtype) if dtype is not None else None)
    self = cls.__new__(cls)
    self.strategy_name = strategy_cls.name
    self.strategy = loaded.strategy
    self.history = []
    self.data_names = []
    self.model = loaded.model
    self.anchor_source = loaded.anchor_source
    self.augment_sources = loaded.augment_sources
    self.tokenizer = resolve_tokenizer(tokenizer, [str(directory), self.anchor_source])
    return self
