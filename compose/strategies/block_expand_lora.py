"""LoRA on the new blocks of ``block_expand``: the ``lora`` option, the module-path patterns the
options use, and merging trained adapters into plain weights.

:class:`NewBlockLora` holds the ``lora`` option (peft ``LoraConfig``'s field names);
:func:`merged_state_dict` gives a state dict with the adapters folded in, which is what
``block_expand`` saves (so its output loads without peft).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = ["NewBlockLora", "merged_state_dict", "inject_adapters"]

_ADAPTER = "default"

# ---------------------------------------------------------------------------- LoRA options
_LORA_ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout"}
_LORA_BIAS = ("none", "lora_only", "all")
# init_lora_weights values that keep B = 0, hence the copies exact identity maps at init.
_ZERO_B_INITS = (True, "gaussian")


@dataclass
class NewBlockLora:
    """LoRA adapters on the new blocks' linear layers (the ``lora`` option of ``block_expand``).

    Field names are peft ``LoraConfig``'s (``lora_alpha`` / ``lora_dropout`` are also
    accepted as ``alpha`` / ``dropout``); the update of a layer is ``(alpha / r) * B A``.

    Attributes:
        r: adapter rank.
        alpha: scale numerator.
        dropout: dropout on the adapter's input (training only).
        target_modules: ``"all-linear"`` (every linear / ``Conv1D`` layer of the new blocks)
            or patterns of module paths inside a block, such as ``["o_proj", "mlp"]`` (a
            pattern names whole path components; ``*`` is a wildcard inside one component).
        use_rslora: scale by ``alpha / sqrt(r)`` instead (rank-stabilised LoRA).
        init_lora_weights: ``True`` (peft's default: ``A`` Kaiming-uniform, ``B`` zero) or
            ``"gaussian"`` (``A`` normal with std ``1/r``, ``B`` zero). Inits that start
            ``B`` non-zero or rewrite the base weights (``False``, PiSSA, OLoRA, LoftQ,
            EVA, CorDA ...) would break identity at init and are refused.
        bias: ``"none"``, ``"lora_only"`` (the biases of the adapted layers also train) or
            ``"all"`` (every bias of the new blocks also trains).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    bias: str = "none"

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | NewBlockLora) -> NewBlockLora:
        """Build from a dict of peft-style fields; unknown or unsupported fields are errors listing the accepted."""
        if isinstance(options, NewBlockLora):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(
                f"lora must be None or a mapping of LoRA fields such as {{'r': 16, 'alpha': 32}}, got {options!r}"
            )
        accepted = [f.name for f in dataclasses.fields(cls)]
        shown = ", ".join(accepted + [f"{k} (= {v})" for k, v in _LORA_ALIASES.items()])
        fields: dict[str, Any] = {}
        for key, value in options.items():
            name = _LORA_ALIASES.get(key, key)
            if name in fields:
                raise ValueError(f"lora gives {name!r} twice (as {key!r} and under another name); give it once")
            if name == "use_dora":
                raise ValueError(
                    "lora.use_dora is not supported on new blocks: DoRA divides by the norm of each weight "
                    "column, which is zero on the zeroed output projections of the copies. Use plain LoRA."
                )
            if name not in accepted:
                raise ValueError(f"{_describe_unknown_lora_field(key)}; accepted lora fields: {shown}")
            fields[name] = value
        return cls(**fields)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, numbers.Integral) or self.r <= 0:
            raise ValueError(f"lora.r must be a positive integer, got {self.r!r}")
        self.r = int(self.r)
        for name in ("alpha", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"lora.{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"lora.use_rslora must be true or false, got {self.use_rslora!r}")
        if self.bias not in _LORA_BIAS:
            raise ValueError(f"lora.bias must be one of {', '.join(map(repr, _LORA_BIAS))}, got {self.bias!r}")
        if self.target_modules != "all-linear":
            self.target_modules = _as_patterns(self.target_modules, "lora.target_modules", allow_all=False)
        init = self.init_lora_weights
        if not any(init is v if isinstance(v, bool) else init == v for v in _ZERO_B_INITS):
            raise ValueError(
                f"lora.init_lora_weights={init!r} would not start the adapters at zero (it draws B at random "
                "or rewrites the base weights), so the expanded model would no longer equal the original at "
                "init; use True (default) or 'gaussian'"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _describe_unknown_lora_field(key: str) -> str:
    try:
        import peft

        peft_fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    except ImportError:  # pragma: no cover - peft is a dependency
        peft_fields = set()
    if key in peft_fields:
        return (
            f"lora field {key!r} (a peft LoraConfig field) is not supported on new blocks: the adapted layers "
            "are chosen by num_blocks/placement, train_modules and lora.target_modules"
        )
    return f"unknown lora field {key!r}"


# ---------------------------------------------------------------------------- module patterns
def _as_patterns(value: Any, option: str, *, allow_all: bool) -> list[str] | None:
    """A list of dotted patterns from a list or a comma-separated string; ``None`` for ``"all"``."""
    if isinstance(value, str):
        if allow_all and value.strip() == "all":
            return None
        value = [v.strip() for v in value.split(",")]
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise ValueError(
            f"{option} must be a list of module paths such as ['mlp'] or ['self_attn.o_proj'], got {value!r}"
        )
    patterns = list(value)
    if allow_all and patterns == ["all"]:
        return None
    if not patterns:
        raise ValueError(
            f"{option} is an empty list; give module paths such as ['mlp']" + (" or 'all'" if allow_all else "")
        )
    for p in patterns:
        if not isinstance(p, str) or not p or any(not part for part in p.split(".")):
            raise ValueError(f"{option} holds {p!r}; each entry is a dotted module path such as 'self_attn.o_proj'")
    return patterns


def _matches(pattern: str, path: str) -> bool:
    """Whether ``pattern``'s dotted components occur as a contiguous run in ``path`` (``*`` per component)."""
    want, have = pattern.split("."), path.split(".")
    k = len(want)
    return any(all(fnmatchcase(h, w) for h, w in zip(have[i : i + k], want)) for i in range(len(have) - k + 1))


def _module_names(block: nn.Module) -> list[str]:
    """Paths inside a block that own parameters (modules, and bare parameters such as fused experts)."""
    names = set()
    for pname, _ in block.named_parameters():
        owner, _, leaf = pname.rpartition(".")
        parts = (owner if leaf in ("weight", "bias") and owner else pname).split(".")
        names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return sorted(names)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


# ---------------------------------------------------------------------------- LoRA on the new blocks
def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every LoRA adapter merged into its base layer, under the plain names.

    peft's own merge, on a copy of each adapted layer: the model itself keeps its adapters and weights.
    """
    state = model.state_dict()
    for name, layer in _lora_layers(model):
        for key in [k for k in state if k.startswith(f"{name}.")]:
            del state[key]
        merged = copy.deepcopy(layer)
        merged.merge(safe_merge=True)
        base = merged.get_base_layer()
        state[f"{name}.weight"] = base.weight.detach()
        if base.bias is not None:
            state[f"{name}.bias"] = base.bias.detach()
    return state


def inject_adapters(
    model: nn.Module,
    lora: NewBlockLora,
    targets: list[str],
    blocks: str,
    layers: list[int],
    *,
    conv: bool,
    seed: int = 0,
) -> None:
    """peft's adapters on the modules ``targets`` (paths inside a block) of the blocks ``layers`` of the block
    list at ``blocks`` (a dotted path), chosen and initialised by peft; ``conv``: they are ``Conv1D`` layers.

    The adapters depend on ``seed`` only, not on the caller's random state.
    """
    import peft

    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        layers_pattern=blocks.rsplit(".", 1)[-1],
        use_rslora=lora.use_rslora,
        init_lora_weights=lora.init_lora_weights,
        fan_in_fan_out=conv,
        bias="none",
    )
    # peft draws A (B starts at zero) from the global generator on the CPU: a fixed seed on a forked
    # generator gives the same adapters for the same options, and leaves the caller's random state alone.
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, model, adapter_name=_ADAPTER)
    # inject_adapter_in_model leaves its config on the model; the model stays a plain transformers one.
    if hasattr(model, "peft_config"):
        del model.peft_config
    want = {f"{blocks}.{i}.{t}" for i in layers for t in targets}
    got = {name for name, _ in _lora_layers(model)}
    if got != want:  # peft matches by suffix and layer index: a model whose paths fool that is named here
        raise RuntimeError(
            f"peft put LoRA adapters on {sorted(got ^ want)[:4]} contrary to the plan (new blocks {layers}, "
            f"modules {targets}); please report this model's module layout"
        )
