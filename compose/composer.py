"""The :class:`Composer`: load models, apply a strategy, fit / evaluate / generate / save / load."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from . import __version__
from .io import atomic_directory, read_json, write_json
from .strategies import STRATEGIES, StrategyConfig, get_strategy, make_config

__all__ = ["Composer", "load_model"]

CONFIG_NAME = "compose.json"
FORMAT_VERSION = 1


def _is_local_path_like(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or os.sep != "/" and os.sep in s


def load_model(
    source: str | os.PathLike | PreTrainedModel,
    *,
    copy_model: bool = True,
    dtype: torch.dtype | str | None = None,
    **kwargs: Any,
) -> tuple[PreTrainedModel, str | None]:
    """Return ``(model, source_string)`` for a hub id, a local directory or a loaded model.

    A loaded model is deep-copied unless ``copy_model=False``, so that compose never
    mutates the caller's object. Hub ids and directories are loaded fresh (no copy).
    """
    if isinstance(source, PreTrainedModel):
        name = getattr(source.config, "_name_or_path", None) or None
        model = copy.deepcopy(source) if copy_model else source
        if dtype is not None:
            model = model.to(dtype=_as_dtype(dtype))
        return model, name
    if isinstance(source, nn.Module):
        raise TypeError(
            f"expected a transformers PreTrainedModel (a *ForCausalLM), got {type(source).__name__}; "
            "wrap custom modules in a PreTrainedModel or pass a checkpoint path"
        )
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a model is a hub id, a local directory or a PreTrainedModel, got {type(source).__name__}")
    src = str(source)
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{src!r} is a file; give the directory holding config.json and the weights")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{src!r} has no config.json: is it a transformers checkpoint directory?")
        src = str(path)
    elif isinstance(source, os.PathLike) or _is_local_path_like(src):
        raise FileNotFoundError(f"model directory {src!r} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=_as_dtype(dtype) if dtype is not None else "auto", **kwargs
        )
    except OSError as e:
        raise OSError(
            f"could not load a causal LM from {src!r}: not a local directory, and the hub id could not be "
            f"fetched or is not cached ({e})"
        ) from e
    return model, src


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def _find_tokenizer(sources: list[str | None]):
    for src in sources:
        if src is None:
            continue
        try:
            return AutoTokenizer.from_pretrained(src)
        except Exception:  # noqa: BLE001 - a model without a tokenizer is fine until text is used
            continue
    return None


class Composer:
    """Augment a frozen anchor model with a strategy, then train, evaluate, generate and save.

    Args:
        anchor: hub id, local checkpoint directory, or a loaded ``PreTrainedModel``.
        augment: augmenting model(s) for strategies that take them (``calm``): same forms,
            or a list of them.
        strategy: a registered strategy name (see ``compose.STRATEGIES``) or a strategy
            config object; ``**options`` are that strategy's options.
        tokenizer: a tokenizer, or a path/hub id to load one from; by default the one saved
            beside the anchor, if any.
        copy_model: a loaded model passed in is deep-copied so that it is never mutated (this
            costs one copy of its weights in memory). Pass ``False`` to let compose take the
            object over and modify it in place, or pass a path so that compose loads the
            model itself and no copy is made.
        dtype: load (or cast) the base models to this dtype (``"bfloat16"`` etc.).

    >>> from compose import Composer
    >>> from compose.testing import tiny_model
    >>> c = Composer(tiny_model("llama"), strategy="block_expand", num_blocks=2)
    >>> sorted({n.split(".")[2] for n, p in c.model.named_parameters() if p.requires_grad})
    ['2', '5']
    """

    def __init__(
        self,
        anchor: str | os.PathLike | PreTrainedModel,
        augment: Any = None,
        *,
        strategy: str | StrategyConfig = "block_expand",
        tokenizer: Any = None,
        copy_model: bool = True,
        dtype: torch.dtype | str | None = None,
        **options: Any,
    ):
        self.strategy_name, config = self._resolve_strategy(strategy, options)
        strategy_cls = get_strategy(self.strategy_name)
        augments_in = [] if augment is None else list(augment) if isinstance(augment, (list, tuple)) else [augment]
        if strategy_cls.takes_augment and not augments_in:
            raise ValueError(
                f"strategy {self.strategy_name!r} needs an augmenting model: Composer(anchor, augment, ...)"
            )
        if not strategy_cls.takes_augment and augments_in:
            raise ValueError(f"strategy {self.strategy_name!r} takes no augmenting model")
        self.strategy = strategy_cls(config)
        anchor_model, self.anchor_source = load_model(anchor, copy_model=copy_model, dtype=dtype)
        loaded = [load_model(a, copy_model=copy_model, dtype=dtype) for a in augments_in]
        augments = [m for m, _ in loaded]
        self.augment_sources = [s for _, s in loaded]
        self.tokenizer = self._resolve_tokenizer(tokenizer, [self.anchor_source])
        self.model: nn.Module = self.strategy.build(anchor_model, augments)
        self.model.eval()
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _resolve_strategy(strategy: str | StrategyConfig, options: dict[str, Any]) -> tuple[str, StrategyConfig]:
        if isinstance(strategy, StrategyConfig):
            if options:
                raise ValueError(f"pass options inside the strategy config, not as keywords: {sorted(options)}")
            for name, cls in STRATEGIES.items():
                if type(strategy) is cls.config_class:
                    return name, strategy
            raise ValueError(f"{type(strategy).__name__} belongs to no registered strategy")
        if not isinstance(strategy, str):
            raise TypeError(f"strategy must be a name or a strategy config, got {type(strategy).__name__}")
        return strategy, make_config(strategy, options)

    @staticmethod
    def _resolve_tokenizer(tokenizer: Any, sources: list[str | None]):
        if isinstance(tokenizer, (str, os.PathLike)):
            return AutoTokenizer.from_pretrained(str(tokenizer))
        if tokenizer is not None:
            return tokenizer
        return _find_tokenizer(sources)

    # ------------------------------------------------------------------ public API
    @property
    def config(self) -> StrategyConfig:
        return self.strategy.config

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters training will update, by name."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def fit(self, train_data: Any, eval_data: Any = None, **train_options: Any) -> Composer:
        """Train the strategy's parameters; see :class:`compose.train.TrainConfig` for the options."""
        from .train import TrainConfig, train

        config = TrainConfig.from_kwargs(**train_options)

        def save_model(model: nn.Module, directory: Path) -> None:
            self.model = model
            self.save(directory)

        result = train(
            self.model, train_data, eval_data, config, tokenizer=self.tokenizer, save_model=save_model,
            desc=f"fit {self.strategy_name}",
        )  # fmt: skip
        self.model, self.history = result.model, result.history
        return self

    def evaluate(self, eval_data: Any, *, batch_size: int = 8, seq_len: int | None = None, **kwargs: Any) -> dict:
        """Loss and perplexity of the composed model on ``eval_data`` (same forms as ``fit``)."""
        from .evaluate import evaluate_loss

        return evaluate_loss(self, eval_data, batch_size=batch_size, seq_len=seq_len, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """``transformers`` ``generate`` on the composed model (greedy, sampling, ``max_new_tokens`` ...)."""
        was_training = self.model.training
        self.model.eval()
        try:
            device = next(self.model.parameters()).device
            input_ids = input_ids.to(device)
            if attention_mask is not None:
                attention_mask = attention_mask.to(device)
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self.model.train(was_training)

    def save(self, directory: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> Path:
        """Write what the strategy needs to rebuild the model, atomically, plus ``compose.json``."""
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            state = self.strategy.save(self.model, tmp)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            write_json(
                tmp / CONFIG_NAME,
                {
                    "format": FORMAT_VERSION,
                    "compose_version": __version__,
                    "strategy": self.strategy_name,
                    "options": self.strategy.config.to_dict(),
                    "anchor": self.anchor_source,
                    "augment": self.augment_sources,
                    "state": state,
                    **(extra or {}),
                },
            )
        return directory

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        anchor: Any = None,
        augment: Any = None,
        tokenizer: Any = None,
        copy_model: bool = True,
        dtype: torch.dtype | str | None = None,
    ) -> Composer:
        """Rebuild a Composer from a directory written by :meth:`save`.

        Strategies that save only what they trained (``calm``, ``lora``) reload their base
        models from the sources recorded at save time, or from ``anchor=``/``augment=``.
        """
        directory = Path(directory)
        meta_path = directory / CONFIG_NAME
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory} does not exist or is not a directory")
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}: it was not written by Composer.save")
        meta = read_json(meta_path)
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{meta_path} has format {meta.get('format')!r}; this compose reads {FORMAT_VERSION}")
        self = cls.__new__(cls)
        self.strategy_name = meta["strategy"]
        self.strategy = get_strategy(self.strategy_name)(make_config(self.strategy_name, meta["options"]))
        self.history = []
        if self.strategy.saves_full_model:
            anchor_model, self.anchor_source = None, meta.get("anchor")
            augments, self.augment_sources = [], []
        else:
            anchor_src = anchor if anchor is not None else meta.get("anchor")
            if anchor_src is None:
                raise ValueError(f"{meta_path} names no anchor model; pass anchor= to Composer.load")
            anchor_model, self.anchor_source = load_model(anchor_src, copy_model=copy_model, dtype=dtype)
            aug_srcs = augment if augment is not None else meta.get("augment") or []
            aug_srcs = list(aug_srcs) if isinstance(aug_srcs, (list, tuple)) else [aug_srcs]
            if any(a is None for a in aug_srcs):
                raise ValueError(f"{meta_path} does not name every augmenting model; pass augment= to Composer.load")
            loaded = [load_model(a, copy_model=copy_model, dtype=dtype) for a in aug_srcs]
            augments = [m for m, _ in loaded]
            self.augment_sources = [s for _, s in loaded]
        self.model = self.strategy.load(directory, meta.get("state", {}), anchor_model, augments)
        if dtype is not None and anchor_model is None:
            self.model.to(dtype=_as_dtype(dtype))
        self.model.eval()
        self.tokenizer = self._resolve_tokenizer(tokenizer, [str(directory), self.anchor_source])
        return self

    def __repr__(self) -> str:
        n_train = sum(p.numel() for p in self.trainable_parameters().values())
        n_all = sum(p.numel() for p in self.model.parameters())
        return (
            f"Composer(strategy={self.strategy_name!r}, anchor={self.anchor_source!r}, "
            f"trainable={n_train:,} of {n_all:,} parameters)"
        )
