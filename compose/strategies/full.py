"""Full fine-tuning baseline: every parameter of the anchor trains.

No parameters are added and nothing is frozen (except, optionally, the embeddings), so
this is the "full fine-tuning" row of the LLaMA Pro ablation and the "m_B fine-tuned"
column of CALM's tables, and the second stage of LLaMA Pro (full SFT of the expanded
model). ``save`` writes a plain transformers checkpoint.

Unlike the other strategies this one *does* change the anchor's weights: its point is
to measure what that costs (forgetting).

>>> from compose import Composer
>>> from compose.testing import tiny_model
>>> c = Composer(tiny_model("llama"), strategy="full")
>>> len(c.trainable_parameters()) == len(list(c.model.parameters()))
True
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from .. import arch
from .base import Strategy, StrategyConfig, register, shard_options

__all__ = ["FullConfig", "Full"]


@dataclass
class FullConfig(StrategyConfig):
    """Options of ``full``.

    Attributes:
        train_embeddings: also train the input embeddings and the LM head (when they are
            tied, one tensor). ``False`` freezes both, a common choice for SFT.
        blocks: train only these decoder blocks (0-based indices); everything else, the
            embeddings and the head included, stays frozen. ``"interleave:N"`` names the N
            blocks after which block expansion would insert its copies: the "train the
            existing blocks, no new ones" ablation of LLaMA Pro (freeze tuning).
    """

    train_embeddings: bool = True
    blocks: list[int] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        b = self.blocks
        if isinstance(b, str):
            kind, _, count = b.partition(":")
            if kind != "interleave" or not count.isdigit() or int(count) < 1:
                raise ValueError(f"blocks={b!r} is not accepted; expected a list of block indices or 'interleave:N'")
        elif b is not None and (
            not isinstance(b, (list, tuple))
            or not b
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in b)
        ):
            raise ValueError(f"blocks must be a non-empty list of block indices, 'interleave:N' or None, got {b!r}")


def trained_blocks(config: FullConfig, num_layers: int) -> list[int] | None:
    """The block indices ``config.blocks`` names for a model of ``num_layers`` blocks (``None``: all)."""
    if config.blocks is None:
        return None
    if isinstance(config.blocks, str):
        from .block_expand import BlockExpandConfig, plan_insertions

        count = int(config.blocks.partition(":")[2])
        return sorted({after for _, after in plan_insertions(num_layers, BlockExpandConfig(num_blocks=count))})
    bad = [i for i in config.blocks if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"blocks {bad} are out of range for a model with {num_layers} blocks (valid: 0..{num_layers - 1})"
        )
    return sorted(set(config.blocks))


@register
class Full(Strategy):
    name = "full"
    method = "full fine-tuning"
    config_class = FullConfig
    saves_full_model = True
    adds = "nothing"
    trains = "everything (or the chosen blocks)"
    saves = "a plain transformers checkpoint"

    def build(self, anchor: PreTrainedModel, augments: list[PreTrainedModel]) -> nn.Module:
        if augments:
            raise ValueError("full takes no augmenting model; pass only the anchor")
        self._unfreeze(anchor)
        return anchor

    def _unfreeze(self, model: PreTrainedModel) -> None:
        chosen = trained_blocks(self.config, arch.num_layers(model))
        if chosen is not None:
            model.requires_grad_(False)
            blocks = arch.get_blocks(model)
            for i in chosen:
                blocks[i].requires_grad_(True)
            return
        model.requires_grad_(True)
        if not self.config.train_embeddings:
            model.get_input_embeddings().requires_grad_(False)
            head = model.get_output_embeddings()
            if head is not None:
                head.requires_grad_(False)

    def save(self, model: nn.Module, directory: Path, *, max_shard_size: int | str | None = None) -> dict[str, Any]:
        model.save_pretrained(directory, safe_serialization=True, **shard_options(max_shard_size))
        return {}

    def load(self, directory, state, anchor, augments) -> nn.Module:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto")
        self._unfreeze(model)
        return model
