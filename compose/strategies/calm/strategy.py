"""The ``calm`` strategy: plan the connections, build a :class:`CalmForCausalLM`, save and load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from ... import arch
from ..base import Strategy, register
from .configuration import CalmConfig
from .modeling import CalmForCausalLM
from .options import INPUT, CalmOptions, check_same_vocabulary, plan_connections
from .serialization import WEIGHTS_NAME, load_composition, load_connection_weights, save_composition

__all__ = ["Calm"]


@register
class Calm(Strategy):
    """CALM (arXiv 2401.02412): cross-attention connections from frozen augmenting models into a frozen anchor.

    >>> from compose import Composer
    >>> from compose.testing import tiny_model
    >>> c = Composer(tiny_model("llama", hidden=48, heads=6), tiny_model("gpt2", seed=1), strategy="calm", every=2)
    >>> c.strategy.plan
    [(0, 1, 1), (0, 3, 3)]
    >>> sorted({n.split(".")[2] for n in c.trainable_parameters()})
    ['k', 'o', 'proj', 'q', 'v']
    """

    name = "calm"
    config_class = CalmOptions
    takes_augment = True

    def __init__(self, config: CalmOptions):
        super().__init__(config)
        #: ``[(augment_index, augment_layer, anchor_layer), ...]`` (set by ``build``/``load``).
        self.plan: list[tuple[int, int, int | str]] = []

    def build(self, anchor: PreTrainedModel, augments: list[PreTrainedModel]) -> nn.Module:
        if anchor is None:
            raise ValueError("calm needs an anchor model")
        self._check_models(anchor, augments)
        self.plan = plan_connections(arch.num_layers(anchor), [arch.num_layers(a) for a in augments], self.config)
        config = CalmConfig.from_models(anchor, augments, self.plan, self.config.to_dict())
        return CalmForCausalLM(config, anchor, augments)

    @staticmethod
    def _check_models(anchor: PreTrainedModel, augments: list[PreTrainedModel]) -> None:
        if not augments:
            raise ValueError("calm needs at least one augmenting model: Composer(anchor, augment, strategy='calm')")
        for model in [anchor, *augments]:
            arch.get_family(model)  # unknown family: a clear error
        check_same_vocabulary(anchor, augments)

    def save(self, model: nn.Module, directory: Path) -> dict[str, Any]:
        if not isinstance(model, CalmForCausalLM):
            raise TypeError(f"calm saves a CalmForCausalLM, got {type(model).__name__}")
        save_composition(model, directory)
        return {"plan": [list(p) for p in model.plan], "layout": "save_pretrained"}

    def load(self, directory, state, anchor, augments) -> nn.Module:
        directory = Path(directory)
        if anchor is None:
            raise ValueError("calm.load needs the anchor model")
        if (directory / "config.json").is_file():
            model = load_composition(CalmForCausalLM, directory, anchor=anchor, augments=augments)
        else:
            model = self._load_legacy(directory, state, anchor, augments)
        self.plan = list(model.plan)
        return model

    def _load_legacy(self, directory: Path, state: dict[str, Any], anchor, augments) -> CalmForCausalLM:
        """A directory from before ``save_pretrained`` (``compose.json`` + ``calm.safetensors``, no config.json)."""
        self._check_models(anchor, augments)
        saved_sizes = state.get("augment_hidden_sizes")
        if saved_sizes is not None and len(augments) != len(saved_sizes):
            raise ValueError(
                f"{directory} was saved with {len(saved_sizes)} augmenting model(s); {len(augments)} given"
            )
        expected = {"anchor hidden size": (state.get("anchor_hidden_size"), arch.hidden_size(anchor))}
        for i, aug in enumerate(augments):
            if saved_sizes is not None:
                expected[f"augmenting model {i} hidden size"] = (saved_sizes[i], arch.hidden_size(aug))
        for what, (saved, given) in expected.items():
            if saved is not None and saved != given:
                raise ValueError(
                    f"{directory} does not fit the given models: saved {what} {saved}, given model has {given}"
                )
        if "plan" in state:
            plan = [(int(a), int(la), INPUT if lb == INPUT else int(lb)) for a, la, lb in state["plan"]]
        else:
            plan = plan_connections(arch.num_layers(anchor), [arch.num_layers(a) for a in augments], self.config)
        config = CalmConfig.from_models(anchor, augments, plan, self.config.to_dict())
        model = CalmForCausalLM(config, anchor, augments)
        load_connection_weights(model, directory / WEIGHTS_NAME, check_metadata=False)
        return model
