"""Model-family knowledge: where a causal LM keeps its decoder blocks and what they write.

Strategies never look at class names. They ask this module:

* :func:`get_family` - the :class:`Family` record for a model (or config), keyed by
  ``config.model_type``; an unknown family is a ``ValueError`` naming the supported ones.
* :func:`get_blocks` / :func:`set_blocks` - the ``nn.ModuleList`` of decoder blocks.
* :func:`residual_output_tensors` - every tensor that writes into the residual stream
  (attention output, MLP output, MoE experts' down projections), *with biases*. Zeroing
  all of them turns a block into an exact identity map (LLaMA Pro, arXiv 2401.02415).
* :func:`renumber_block` - rewrite every ``layer_idx`` attribute inside a block so that
  it owns its own KV-cache slot.
* :func:`per_layer_config_keys` - config lists that hold one entry per layer
  (``layer_types``), which must grow in step with the blocks.

The names are written out per family on purpose: substring matching ("proj" in name)
silently misses GPT-2's ``c_proj`` (a ``Conv1D``), GPT-NeoX's ``dense_4h_to_h`` or
Mixtral's fused expert tensor, and zeroes things it should not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

__all__ = [
    "Family",
    "FAMILIES",
    "get_family",
    "get_blocks",
    "set_blocks",
    "residual_output_tensors",
    "renumber_block",
    "per_layer_config_keys",
    "hidden_size",
    "num_attention_heads",
    "num_layers",
    "max_positions",
]


@dataclass(frozen=True)
class Family:
    """Where one model family keeps things.

    Attributes:
        name: ``config.model_type``.
        blocks: dotted path from the ``*ForCausalLM`` module to the block list.
        residual_outputs: dotted paths, relative to a block, of the modules (or bare
            parameters) whose output is added to the residual stream.
        moe: whether the MLP is a mixture of experts (routers stay as they are; the
            experts' output tensors are zeroed).
    """

    name: str
    blocks: str
    residual_outputs: tuple[str, ...]
    moe: bool = False


_LLAMA_LIKE = ("self_attn.o_proj", "mlp.down_proj")

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("llama", "model.layers", _LLAMA_LIKE),
        Family("mistral", "model.layers", _LLAMA_LIKE),
        Family("qwen2", "model.layers", _LLAMA_LIKE),
        Family("qwen3", "model.layers", _LLAMA_LIKE),
        Family("gemma", "model.layers", _LLAMA_LIKE),
        # Gemma-2 normalises the attention / MLP output before the residual add; RMSNorm(0) = 0,
        # so zeroing the projection is still enough.
        Family("gemma2", "model.layers", _LLAMA_LIKE),
        # Gemma-3 (text): the same, plus q/k norms inside attention and sliding/full `layer_types`
        # that grow with the blocks (per_layer_config_keys).
        Family("gemma3_text", "model.layers", _LLAMA_LIKE),
        Family("phi3", "model.layers", _LLAMA_LIKE),
        Family("gpt2", "transformer.h", ("attn.c_proj", "mlp.c_proj")),
        Family("gpt_neox", "gpt_neox.layers", ("attention.dense", "mlp.dense_4h_to_h")),
        Family("mixtral", "model.layers", ("self_attn.o_proj", "mlp.experts.down_proj"), moe=True),
    ]
}


def _config_of(model_or_config: PreTrainedModel | PretrainedConfig) -> PretrainedConfig:
    if isinstance(model_or_config, PretrainedConfig):
        return model_or_config
    config = getattr(model_or_config, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(
            f"expected a transformers PreTrainedModel or PretrainedConfig, got {type(model_or_config).__name__}"
        )
    return config


def get_family(model_or_config: PreTrainedModel | PretrainedConfig) -> Family:
    """The :class:`Family` of a model or config; ``ValueError`` if compose does not know it."""
    model_type = getattr(_config_of(model_or_config), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"model family {model_type!r} is not supported; supported families: "
            f"{', '.join(sorted(FAMILIES))}. Adding one is a single Family(...) line in compose/arch.py "
            "(see docs/contributing.md)."
        )
    return FAMILIES[model_type]


def _resolve(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(
                f"{type(root).__name__} has no attribute path {path!r} (failed at {part!r}); "
                "the transformers version may have renamed it"
            )
        obj = getattr(obj, part)
    return obj


def get_blocks(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder blocks of a causal LM, in order."""
    blocks = _resolve(model, get_family(model).blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"expected the blocks of {type(model).__name__} to be an nn.ModuleList, got {type(blocks)}")
    return blocks


def set_blocks(model: PreTrainedModel, blocks: nn.ModuleList) -> None:
    """Replace the block list of ``model`` (config is the caller's business)."""
    parent_path, _, attr = get_family(model).blocks.rpartition(".")
    parent = _resolve(model, parent_path) if parent_path else model
    setattr(parent, attr, blocks)


def residual_output_tensors(model: PreTrainedModel, block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every weight and bias that writes into the residual stream.

    For an ``nn.Linear`` / ``Conv1D`` that is its ``weight`` and ``bias``; for a bare
    parameter (fused MoE experts) the parameter itself and a sibling ``<name>_bias`` if
    the family has one.
    """
    out: list[tuple[str, torch.Tensor]] = []
    for path in get_family(model).residual_outputs:
        target = _resolve(block, path)
        if isinstance(target, nn.Module):
            for pname, param in target.named_parameters(recurse=False):
                out.append((f"{path}.{pname}", param))
        elif isinstance(target, torch.Tensor):
            out.append((path, target))
            parent_path, _, attr = path.rpartition(".")
            parent = _resolve(block, parent_path) if parent_path else block
            bias = getattr(parent, f"{attr}_bias", None)
            if isinstance(bias, torch.Tensor):
                out.append((f"{path}_bias", bias))
        else:
            raise TypeError(f"{path!r} is neither a module nor a tensor in {type(block).__name__}")
    return out


def renumber_block(block: nn.Module, index: int) -> None:
    """Set every ``layer_idx`` inside ``block`` to ``index`` (its KV-cache slot)."""
    for module in block.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = index


def per_layer_config_keys(config: PretrainedConfig) -> list[str]:
    """Config attributes holding one entry per decoder layer (e.g. ``layer_types``)."""
    n = num_layers(config)
    keys = []
    for key in ("layer_types",):
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"config.{key} has {len(value)} entries but the model has {n} layers")
            keys.append(key)
    return keys


def num_layers(model_or_config: PreTrainedModel | PretrainedConfig) -> int:
    return int(_config_of(model_or_config).num_hidden_layers)


def hidden_size(model_or_config: PreTrainedModel | PretrainedConfig) -> int:
    return int(_config_of(model_or_config).hidden_size)


def num_attention_heads(model_or_config: PreTrainedModel | PretrainedConfig) -> int:
    return int(_config_of(model_or_config).num_attention_heads)


def max_positions(model_or_config: PreTrainedModel | PretrainedConfig) -> int | None:
    """The longest sequence the model's positions allow, or ``None`` if unbounded/unknown."""
    config = _config_of(model_or_config)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
