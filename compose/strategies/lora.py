"""LoRA baseline through ``peft`` (Hu et al., arXiv 2106.09685).

The anchor stays frozen; low-rank adapters ``W + (alpha / r) * B A`` are added to its
linear layers and only ``A`` and ``B`` train. ``B`` starts at zero, so before training
the adapted model's outputs equal the anchor's exactly. This is the baseline the LLaMA
Pro ablation (rank 1024) and CALM's Table 5 compare against.

``save`` writes a standard peft adapter (``adapter_model.safetensors`` +
``adapter_config.json``) that ``peft.PeftModel.from_pretrained(anchor, dir)`` also
reads; :func:`merge_and_export` writes merged plain weights that
``AutoModelForCausalLM.from_pretrained`` loads without peft.

>>> from compose import Composer
>>> from compose.testing import tiny_model
>>> c = Composer(tiny_model("llama"), strategy="lora", r=4)
>>> all("lora_" in n for n in c.trainable_parameters())
True
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from ..rules import option
from .base import Strategy, StrategyConfig, register, shard_options

__all__ = ["LoraConfig", "Lora", "merge_and_export"]

_BIAS = ("none", "all", "lora_only")


@dataclass
class LoraConfig(StrategyConfig):
    """Options of ``lora``.

    Attributes:
        r: adapter rank.
        alpha: scale numerator; the update is ``(alpha / r) * B A``.
        dropout: dropout on the adapter's input (training only).
        target_modules: ``"all-linear"`` (every linear / Conv1D layer except the LM
            head, whatever the family calls them) or a list of module-name suffixes such
            as ``["q_proj", "v_proj"]``.
        bias: ``"none"``, ``"all"`` or ``"lora_only"``: which biases also train.
        use_rslora: scale by ``alpha / sqrt(r)`` instead (rank-stabilised LoRA), advisable
            at large ranks.
    """

    r: int = option(8, ge=1)
    alpha: float = option(16.0, gt=0)
    dropout: float = option(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    bias: str = "none"
    use_rslora: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bias not in _BIAS:
            raise ValueError(f"bias must be one of {', '.join(map(repr, _BIAS))}, got {self.bias!r}")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = [str(m) for m in self.target_modules]
            if not self.target_modules:
                raise ValueError('target_modules is an empty list; give module names or "all-linear"')
        elif not isinstance(self.target_modules, str):
            raise ValueError(f'target_modules must be "all-linear" or a list of names, got {self.target_modules!r}')

    def to_peft(self):
        import peft

        return peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            bias=self.bias,
            use_rslora=self.use_rslora,
        )


@register
class Lora(Strategy):
    name = "lora"
    method = "LoRA"
    paper = "https://arxiv.org/abs/2106.09685"
    library_name = "peft"
    adds = "LoRA adapters through peft"
    trains = "the adapters"
    saves = "a peft adapter (`compose export` merges it)"
    config_class = LoraConfig

    def build(self, anchor: PreTrainedModel, augments: list[PreTrainedModel]) -> nn.Module:
        import peft

        if augments:
            raise ValueError("lora takes no augmenting model; pass only the anchor")
        anchor.requires_grad_(False)
        try:
            # ``anchor`` belongs to compose (the Composer copied or loaded it), so wrapping in place is fine.
            return peft.get_peft_model(anchor, self.config.to_peft())
        except ValueError as e:
            raise ValueError(f"lora: {e} (model type {anchor.config.model_type!r})") from e

    def save(self, model: nn.Module, directory: Path, *, max_shard_size: int | str | None = None) -> dict[str, Any]:
        # an adapter is a few small tensors: one file, whatever max_shard_size says
        model.save_pretrained(str(directory), safe_serialization=True)
        return {"adapter": "adapter_model.safetensors", "base": _base_signature(model.get_base_model().config)}

    def load(self, directory, state, anchor, augments) -> nn.Module:
        import peft

        if anchor is None:
            raise ValueError("lora needs its anchor model to load an adapter")
        _check_base(directory, state.get("base"), anchor.config)
        anchor.requires_grad_(False)
        # is_trainable: a reloaded adapter can be trained further (fit after load).
        return peft.PeftModel.from_pretrained(anchor, str(directory), is_trainable=True)

    def export(self, model: nn.Module, directory: Path, *, max_shard_size: int | str | None = None) -> None:
        """Write merged plain weights (``W + (alpha / r) B A``) as a transformers checkpoint."""
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(str(directory), safe_serialization=True, **shard_options(max_shard_size))


_SIGNATURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


def _base_signature(config) -> dict[str, Any]:
    """What an adapter's shapes and module names depend on: the base model's family and sizes."""
    return {k: getattr(config, k, None) for k in _SIGNATURE_KEYS}


def _check_base(directory, saved: dict[str, Any] | None, config) -> None:
    """An adapter trained on one base model must not load silently onto another."""
    if not saved:
        return
    now = _base_signature(config)
    diff = [f"{k}: adapter {saved.get(k)!r} vs anchor {now[k]!r}" for k in _SIGNATURE_KEYS if saved.get(k) != now[k]]
    if diff:
        raise ValueError(
            f"the LoRA adapter in {directory} was trained on another base model ({'; '.join(diff)}); "
            "pass the anchor it was trained on (Composer.load(dir, anchor=...))"
        )


def merge_and_export(composer, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Merge a ``lora`` Composer's adapters into a copy of the anchor and save it as a plain checkpoint.

    The result (with the tokenizer, when known) loads with ``AutoModelForCausalLM.from_pretrained``
    and no peft. The Composer itself is left as it was (the merge happens on a copy, which
    costs one copy of the weights in memory).
    """
    from ..io import atomic_directory

    if composer.strategy_name != "lora":
        raise ValueError(f"merge_and_export needs a lora Composer, got strategy {composer.strategy_name!r}")
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite, what="export directory") as tmp:
        composer.strategy.export(composer.model, tmp)
        if composer.tokenizer is not None:
            composer.tokenizer.save_pretrained(tmp)
    return directory
