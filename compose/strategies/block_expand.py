"""Block expansion (LLaMA Pro, Wu et al., arXiv 2401.02415).

Copies of decoder blocks are inserted into a frozen pretrained model. Each copy's
residual-output tensors (attention output and MLP / experts output, weights *and*
biases) are zeroed, so the copy computes ``x + 0 + 0`` and the expanded model's
outputs equal the original's exactly. Only the copies train; embeddings, norms, the LM
head and every original block stay frozen. The result is a plain transformers model
with more layers: ``save`` writes a standard checkpoint that
``AutoModelForCausalLM.from_pretrained`` loads without custom code.

>>> from compose import Composer
>>> from compose.testing import tiny_model
>>> c = Composer(tiny_model("llama"), strategy="block_expand", num_blocks=2)
>>> c.model.config.num_hidden_layers, c.strategy.inserted
(6, [2, 5])
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from .. import arch
from .base import Strategy, StrategyConfig, register

__all__ = ["BlockExpandConfig", "BlockExpand", "plan_insertions"]

_NAMED_PLACEMENTS = ("interleave", "top", "bottom")


@dataclass
class BlockExpandConfig(StrategyConfig):
    """Options of ``block_expand``.

    Attributes:
        num_blocks: how many blocks to add (LLaMA Pro: 8 on a 32-block model). Ignored
            when ``placement`` is a list.
        placement: ``"interleave"`` (LLaMA Pro: split the blocks into ``num_blocks``
            near-equal groups and put a copy of each group's last block right after it),
            ``"top"`` (copies of the last block after it), ``"bottom"`` (copies of the
            first block before it), or a list of original block indices, a copy of
            each inserted right after it (repeat an index to add several copies).
        train_embeddings: also train the input embeddings (off in LLaMA Pro, which freezes
            embeddings, final norm and head; useful when new tokens were added).
    """

    num_blocks: int | None = None
    placement: str | list[int] = "interleave"
    train_embeddings: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.placement, (list, tuple)):
            self.placement = [int(i) for i in self.placement]
            if not self.placement:
                raise ValueError("placement is an empty list; give at least one block index")
            if self.num_blocks is not None and self.num_blocks != len(self.placement):
                raise ValueError(
                    f"num_blocks={self.num_blocks} disagrees with placement of {len(self.placement)} indices; "
                    "give one or the other"
                )
            self.num_blocks = len(self.placement)
        elif self.placement not in _NAMED_PLACEMENTS:
            raise ValueError(
                f"placement must be one of {', '.join(map(repr, _NAMED_PLACEMENTS))} or a list of block indices, "
                f"got {self.placement!r}"
            )
        if self.num_blocks is None:
            raise ValueError("block_expand needs num_blocks (how many blocks to add), e.g. num_blocks=8")
        if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive integer, got {self.num_blocks!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"num_blocks": self.num_blocks, "placement": self.placement, "train_embeddings": self.train_embeddings}


def plan_insertions(num_original: int, config: BlockExpandConfig) -> list[tuple[int, int]]:
    """``[(source_block, insert_after), ...]`` in original indices; ``insert_after=-1`` is before block 0.

    Interleave puts copy k after block ``ceil((k+1) * L / P) - 1``, so the groups are as
    even as possible, the last copy always follows the last block, and ``P`` need not
    divide ``L`` (or may exceed it: then a block gets several copies).
    """
    n, p = num_original, config.num_blocks
    if isinstance(config.placement, list):
        bad = [i for i in config.placement if not -n <= i < n]
        if bad:
            raise ValueError(
                f"placement indices {bad} are out of range for a model with {n} blocks (valid: 0..{n - 1})"
            )
        return sorted(((i % n, i % n) for i in config.placement), key=lambda t: t[1])
    if config.placement == "interleave":
        return [(-(-(k + 1) * n // p) - 1,) * 2 for k in range(p)]
    if config.placement == "top":
        return [(n - 1, n - 1)] * p
    return [(0, -1)] * p  # bottom


def _identity_copy(model: PreTrainedModel, block: nn.Module) -> nn.Module:
    # Share the config object (some blocks keep a reference to it) but copy every tensor,
    # so the copy owns its storage: shared storage breaks safetensors and ties the copy's
    # training to the frozen source.
    new = copy.deepcopy(block, memo={id(model.config): model.config})
    with torch.no_grad():
        for _, tensor in arch.residual_output_tensors(model, new):
            tensor.zero_()
    return new


@register
class BlockExpand(Strategy):
    name = "block_expand"
    config_class = BlockExpandConfig
    saves_full_model = True

    def __init__(self, config: BlockExpandConfig):
        super().__init__(config)
        #: positions of the inserted blocks in the expanded model (set by ``build``/``load``).
        self.inserted: list[int] = []

    def build(self, anchor: PreTrainedModel, augments: list[PreTrainedModel]) -> nn.Module:
        if augments:
            raise ValueError("block_expand takes no augmenting model; pass only the anchor")
        family = arch.get_family(anchor)
        blocks = list(arch.get_blocks(anchor))
        n = len(blocks)
        if n != arch.num_layers(anchor):
            raise ValueError(
                f"{family.name} model has {n} blocks but config.num_hidden_layers={arch.num_layers(anchor)}"
            )
        plan = plan_insertions(n, self.config)
        per_layer = {key: list(getattr(anchor.config, key)) for key in arch.per_layer_config_keys(anchor.config)}

        new_blocks: list[nn.Module] = []
        new_lists: dict[str, list] = {key: [] for key in per_layer}
        inserted: list[int] = []

        def add(block: nn.Module, source: int, is_new: bool) -> None:
            if is_new:
                inserted.append(len(new_blocks))
            new_blocks.append(block)
            for key, values in per_layer.items():
                new_lists[key].append(values[source])

        for src, after in plan:
            if after == -1:
                add(_identity_copy(anchor, blocks[src]), src, True)
        for i, block in enumerate(blocks):
            add(block, i, False)
            for src, after in plan:
                if after == i:
                    add(_identity_copy(anchor, blocks[src]), src, True)

        for index, block in enumerate(new_blocks):
            arch.renumber_block(block, index)
        arch.set_blocks(anchor, nn.ModuleList(new_blocks))
        anchor.config.num_hidden_layers = len(new_blocks)
        for key, values in new_lists.items():
            setattr(anchor.config, key, values)
        self.inserted = inserted
        self._freeze(anchor)
        return anchor

    def _freeze(self, model: PreTrainedModel) -> None:
        model.requires_grad_(False)
        blocks = arch.get_blocks(model)
        for index in self.inserted:
            blocks[index].requires_grad_(True)
        if self.config.train_embeddings:
            model.get_input_embeddings().requires_grad_(True)

    def save(self, model: nn.Module, directory: Path) -> dict[str, Any]:
        model.save_pretrained(directory, safe_serialization=True)
        return {"inserted": list(self.inserted)}

    def load(self, directory, state, anchor, augments) -> nn.Module:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto")
        self.inserted = [int(i) for i in state["inserted"]]
        n = arch.num_layers(model)
        if any(not 0 <= i < n for i in self.inserted):
            raise ValueError(f"{directory}/compose.json lists inserted blocks {self.inserted} but the model has {n}")
        self._freeze(model)
        return model
