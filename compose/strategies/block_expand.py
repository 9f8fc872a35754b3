"""Block expansion (LLaMA Pro, Wu et al., arXiv 2401.02415).

Copies of decoder blocks are inserted into a frozen pretrained model. Each copy's
residual-output tensors (attention output and MLP / experts output, weights *and*
biases) are zeroed, so the copy computes ``x + 0 + 0`` and the expanded model's
outputs equal the original's exactly. Only the copies train; embeddings, norms, the LM
head and every original block stay frozen. The result is a plain transformers model
with more layers: ``save`` writes a standard checkpoint that
``AutoModelForCausalLM.from_pretrained`` loads without custom code.

Two options narrow what trains inside the copies:

* ``train_modules=["mlp"]`` - only the parameters under these module paths train (the
  rest of each copy stays as copied);
* ``lora={"r": 16, "alpha": 32}`` - the copies stay frozen and low-rank adapters on
  their linear layers train instead (``B`` starts at zero, so the model is still the
  original at init). ``save`` merges the adapters into the copies' weights: the output
  is the same plain checkpoint, no peft needed to load it.

>>> from compose import Composer
>>> from compose.testing import tiny_model
>>> c = Composer(tiny_model("llama"), strategy="block_expand", num_blocks=2)
>>> c.model.config.num_hidden_layers, c.strategy.inserted
(6, [2, 5])
>>> c = Composer(tiny_model("llama"), strategy="block_expand", num_blocks=2, lora={"r": 4})
>>> sorted({n.split(".")[-3] for n in c.trainable_parameters()})
['lora_A', 'lora_B']
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .. import arch
from ..rules import OptionError, option
from .base import Strategy, StrategyConfig, register, shard_options
from .block_expand_lora import (
    NewBlockLora,
    _as_patterns,
    _is_linear,
    _lora_layers,
    _matches,
    _module_names,
    inject_adapters,
    merged_state_dict,
)

__all__ = ["BlockExpandConfig", "BlockExpand", "NewBlockLora", "plan_insertions", "merged_state_dict"]

_NAMED_PLACEMENTS = ("interleave", "top", "bottom")
#: at most this many copies per original block: more only grows memory (LLaMA Pro adds 1 per 4).
MAX_BLOCKS_PER_LAYER = 4


# ---------------------------------------------------------------------------- config
@dataclass
class BlockExpandConfig(StrategyConfig):
    """Options of ``block_expand``.

    Attributes:
        num_blocks: how many blocks to add (LLaMA Pro: 8 on a 32-block model), at most
            4 per original block. Ignored when ``placement`` is a list.
        placement: ``"interleave"`` (LLaMA Pro: split the blocks into ``num_blocks``
            near-equal groups and put a copy of each group's last block right after it),
            ``"top"`` (copies of the last block after it), ``"bottom"`` (copies of the
            first block before it), or a list of original block indices, a copy of
            each inserted right after it (repeat an index to add several copies).
        train_embeddings: also train the input embeddings (off in LLaMA Pro, which freezes
            embeddings, final norm and head; useful when new tokens were added).
        train_modules: which parts of the new blocks train: ``None``/``"all"`` (default:
            all of them) or module paths inside a block such as ``["mlp"]`` or
            ``["self_attn.o_proj", "mlp.down_proj"]`` (a path names whole components and
            matches anywhere in a parameter's path; ``*`` is a wildcard inside one
            component). With ``lora``, the adapters go only on linear layers inside these.
        lora: ``None`` (train the chosen parameters themselves) or LoRA fields as a dict,
            e.g. ``{"r": 16, "alpha": 32}`` (see :class:`NewBlockLora`): only adapters on
            the new blocks' linear layers train, and ``save`` merges them.
    """

    num_blocks: int | None = option(None, ge=1)
    placement: str | list[int] = "interleave"
    train_embeddings: bool = False
    train_modules: list[str] | str | None = None
    lora: NewBlockLora | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()  # types and ranges of every field
        if isinstance(self.placement, list):
            if not self.placement:
                raise ValueError("placement is an empty list; give at least one block index")
            if self.num_blocks is not None and self.num_blocks != len(self.placement):
                raise ValueError(
                    f"num_blocks={self.num_blocks!r} disagrees with placement of {len(self.placement)} indices; "
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
        if self.train_modules is not None:
            self.train_modules = _as_patterns(self.train_modules, "train_modules", allow_all=True)
        if self.lora is not None:
            self.lora = NewBlockLora.from_options(self.lora)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_blocks": self.num_blocks,
            "placement": self.placement,
            "train_embeddings": self.train_embeddings,
            "train_modules": self.train_modules,
            "lora": self.lora.to_dict() if self.lora is not None else None,
        }


def plan_insertions(num_original: int, config: BlockExpandConfig) -> list[tuple[int, int]]:
    """``[(source_block, insert_after), ...]`` in original indices; ``insert_after=-1`` is before block 0.

    Interleave puts copy k after block ``ceil((k+1) * L / P) - 1``, so the groups are as
    even as possible, the last copy always follows the last block, and ``P`` need not
    divide ``L`` (or may exceed it: then a block gets several copies).
    """
    n, p = num_original, config.num_blocks
    if p > MAX_BLOCKS_PER_LAYER * n:
        raise OptionError(
            f"num_blocks={p} is not accepted for a model of {n} blocks; expected at most "
            f"{MAX_BLOCKS_PER_LAYER} x {n} = {MAX_BLOCKS_PER_LAYER * n} new blocks (LLaMA Pro adds one block per four)"
        )
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


def inserted_positions(num_original: int, plan: list[tuple[int, int]]) -> list[int]:
    """Where the copies of ``plan`` land in the expanded model (as :meth:`BlockExpand.build` places them)."""
    position = sum(1 for _, after in plan if after == -1)
    out = list(range(position))
    for i in range(num_original):
        position += 1
        for _, after in plan:
            if after == i:
                out.append(position)
                position += 1
    return out


def _check_inserted(directory: Any, inserted: list[int], num_layers: int, config: BlockExpandConfig) -> None:
    """The saved positions of the new blocks must be where the saved options put them (which blocks train)."""
    original = num_layers - len(inserted)
    try:
        expected = inserted_positions(original, plan_insertions(original, config)) if original > 0 else None
    except ValueError:
        expected = None
    if expected != sorted(inserted) or len(set(inserted)) != len(inserted):
        raise ValueError(
            f"{directory}/compose.json lists inserted blocks {inserted}, but its options (num_blocks="
            f"{config.num_blocks}, placement={config.placement!r}) on this {num_layers}-block model put the new "
            f"blocks at {expected}: the file was edited or belongs to another model, and the wrong blocks would "
            "train. Restore compose.json as Composer.save wrote it"
        )


def _identity_copy(model: PreTrainedModel, block: nn.Module) -> nn.Module:
    # Share the config object (some blocks keep a reference to it) but copy every tensor,
    # so the copy owns its storage: shared storage breaks safetensors and ties the copy's
    # training to the frozen source.
    new = copy.deepcopy(block, memo={id(model.config): model.config})
    with torch.no_grad():
        for _, tensor in arch.residual_output_tensors(model, new):
            tensor.zero_()
    return new


# ---------------------------------------------------------------------------- the strategy
@register
class BlockExpand(Strategy):
    name = "block_expand"
    method = "block expansion (LLaMA Pro)"
    paper = "https://arxiv.org/abs/2401.02415"
    config_class = BlockExpandConfig
    saves_full_model = True
    adds = "identity-initialised copies of blocks"
    trains = "the copies (or LoRA adapters on them)"
    saves = "a plain transformers checkpoint"

    def __init__(self, config: BlockExpandConfig):
        super().__init__(config)
        #: positions of the inserted blocks in the expanded model (set by ``build``/``load``).
        self.inserted: list[int] = []

    def check(self, model_config: Any) -> None:
        """``num_blocks`` and ``placement`` against the anchor's number of blocks (the plan holds the rule)."""
        plan_insertions(arch.num_layers(model_config), self.config)

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

    # -------------------------------------------------------------- what trains
    def _freeze(self, model: PreTrainedModel) -> None:
        """Freeze everything, then make the declared parts of the new blocks trainable (or add adapters)."""
        model.requires_grad_(False)
        blocks = arch.get_blocks(model)
        new = [blocks[i] for i in self.inserted]
        # The family's output projections, by path (once adapters wrap them, their weights move one level down).
        residual = arch.get_family(model).residual_outputs
        if self.config.lora is None:
            self._train_parameters(model, new)
        else:
            self._add_adapters(model, new, residual)
        if self.config.train_embeddings:
            model.get_input_embeddings().requires_grad_(True)

    def _check_patterns(self, block: nn.Module) -> None:
        names = _module_names(block)
        for pattern in self.config.train_modules or ():
            if not any(_matches(pattern, name) for name in names):
                raise ValueError(
                    f"train_modules pattern {pattern!r} matches nothing in the new blocks; "
                    f"the modules of a block are: {', '.join(names)}"
                )

    def _train_parameters(self, model: PreTrainedModel, new: list[nn.Module]) -> None:
        patterns = self.config.train_modules
        if new:
            self._check_patterns(new[0])
        for block in new:
            for pname, param in block.named_parameters():
                if patterns is None or any(_matches(p, pname) for p in patterns):
                    param.requires_grad_(True)
        if new and patterns is not None:
            outputs = arch.residual_output_tensors(model, new[0])
            if not any(t.requires_grad for _, t in outputs):
                self._dead_blocks_error(model, "train_modules")

    def _dead_blocks_error(self, model: PreTrainedModel, option: str) -> None:
        outputs = arch.get_family(model).residual_outputs
        raise ValueError(
            f"{option} leaves every output projection of the new blocks ({', '.join(outputs)}) frozen. They "
            "start at zero, so the new blocks would stay identity maps and nothing chosen could ever learn "
            f"(its gradient is zero). Include one of them, e.g. train_modules={[outputs[-1].split('.')[0]]!r} "
            f"or {[outputs[0]]!r}."
        )

    def _lora_targets(self, block: nn.Module) -> list[str]:
        lora = self.config.lora
        linear = [name for name, m in block.named_modules() if name and _is_linear(m)]
        chosen = linear
        if self.config.train_modules is not None:
            self._check_patterns(block)
            for pattern in self.config.train_modules:
                if not any(_matches(pattern, name) for name in linear):
                    raise ValueError(
                        f"train_modules pattern {pattern!r} holds no linear layer of the new blocks to put a "
                        f"LoRA adapter on; the linear layers are: {', '.join(linear)}"
                    )
            chosen = [n for n in chosen if any(_matches(p, n) for p in self.config.train_modules)]
        if lora.target_modules != "all-linear":
            for pattern in lora.target_modules:
                if not any(_matches(pattern, name) for name in chosen):
                    raise ValueError(
                        f"lora.target_modules pattern {pattern!r} matches no linear layer of the new blocks"
                        + (" inside train_modules" if self.config.train_modules is not None else "")
                        + f"; candidates: {', '.join(chosen)}"
                    )
            chosen = [n for n in chosen if any(_matches(p, n) for p in lora.target_modules)]
        return chosen

    def _add_adapters(self, model: PreTrainedModel, new: list[nn.Module], residual: tuple[str, ...]) -> None:
        lora = self.config.lora
        if not new:
            return
        if _lora_layers(model):
            raise ValueError("this model already holds LoRA adapters; block_expand adds its own to the new blocks")
        targets = self._lora_targets(new[0])
        # An adapter on an output projection is needed: a trained bias alone would leave every adapter's
        # gradient zero (the projection's weight stays zero).
        if not any(t in residual for t in targets):
            self._dead_blocks_error(model, "lora (with train_modules / lora.target_modules)")
        conv = isinstance(new[0].get_submodule(targets[0]), Conv1D)
        inject_adapters(model, lora, targets, arch.get_family(model).blocks, list(self.inserted), conv=conv)
        model.requires_grad_(False)
        blocks = arch.get_blocks(model)
        for i in self.inserted:
            for tname in targets:
                layer = blocks[i].get_submodule(tname)
                for pname, param in layer.named_parameters():
                    if pname.startswith(("lora_A.", "lora_B.")):
                        param.requires_grad_(True)
                base_bias = layer.get_base_layer().bias
                if lora.bias == "lora_only" and base_bias is not None:
                    base_bias.requires_grad_(True)
            if lora.bias == "all":
                for pname, param in blocks[i].named_parameters():
                    if pname.split(".")[-1] == "bias":
                        param.requires_grad_(True)

    # -------------------------------------------------------------- save / load
    def save(self, model: nn.Module, directory: Path, *, max_shard_size: int | str | None = None) -> dict[str, Any]:
        self.export(model, directory, max_shard_size=max_shard_size)
        return {"inserted": list(self.inserted)}

    def export(self, model: nn.Module, directory: Path, *, max_shard_size: int | str | None = None) -> None:
        """A plain transformers checkpoint; LoRA adapters are merged into the new blocks' weights."""
        options = shard_options(max_shard_size)
        if _lora_layers(model):
            model.save_pretrained(directory, state_dict=merged_state_dict(model), safe_serialization=True, **options)
        else:
            model.save_pretrained(directory, safe_serialization=True, **options)

    def load(self, directory, state, anchor, augments) -> nn.Module:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto")
        if not isinstance(state.get("inserted"), list):
            raise ValueError(
                f"{directory}/compose.json has no state.inserted (the positions of the new blocks): the file was "
                "edited or damaged; restore it as Composer.save wrote it"
            )
        self.inserted = [int(i) for i in state["inserted"]]
        n = arch.num_layers(model)
        if any(not 0 <= i < n for i in self.inserted):
            raise ValueError(f"{directory}/compose.json lists inserted blocks {self.inserted} but the model has {n}")
        _check_inserted(directory, self.inserted, n, self.config)
        # With lora, fresh adapters (B = 0) go on the merged blocks: the loaded model equals the saved one
        # and further training continues from it.
        self._freeze(model)
        return model
