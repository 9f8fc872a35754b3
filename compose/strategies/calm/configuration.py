"""``CalmConfig``: the transformers config of a CALM composition, and the fingerprints of its bases.

The config names the anchor and augmenting models (hub id or local directory), carries the
connection plan and every option, and records a fingerprint of each base model (family,
shapes, a few config fields and a hash of a few tensors) so that loading the composition
onto a different model is an error instead of silently different logits.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from ... import arch

__all__ = ["CalmConfig", "CALM_FORMAT_VERSION", "fingerprint", "compare_fingerprints"]

#: Version of the saved layout (config keys + weight names). A directory written with a
#: higher number was written by a newer compose and is refused.
CALM_FORMAT_VERSION = 1

#: Config fields of a base model that change what its weights compute. An edit of any of
#: them (``num_attention_heads`` in a config.json, say) is a fingerprint mismatch.
_CONFIG_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "intermediate_size",
)


class CalmConfig(PretrainedConfig):
    """Config of a :class:`~compose.strategies.calm.CalmForCausalLM` (``model_type="compose_calm"``).

    Args:
        anchor: hub id or local directory of the anchor model (``None`` when it was built
            from an in-memory model; pass ``anchor=`` to ``from_pretrained`` then).
        augments: hub ids or directories of the augmenting models, in order.
        plan: ``[[augment_index, augment_layer, anchor_layer], ...]`` (anchor_layer an index
            or ``"input"``).
        options: the strategy options (:class:`~compose.strategies.calm.CalmOptions` as a dict).
        fingerprints: ``{"anchor": {...}, "augments": [{...}, ...]}`` from :func:`fingerprint`.
        calm_format_version: layout version (:data:`CALM_FORMAT_VERSION`).
        cross_tokenizers: per augmenting model, ``None`` (it reads the anchor's token ids) or
            ``{"name", "vocab", "anchor_vocab", "path"}``: it reads the text with its own tokenizer,
            ``name`` says where that tokenizer came from, ``vocab``/``anchor_vocab`` are vocabulary
            fingerprints of it and of the anchor's tokenizer, ``path`` the folder (inside the saved
            directory) it is saved in.

    ``vocab_size``, ``max_position_embeddings`` and the special token ids are copied from the
    anchor, so that tools reading them off ``model.config`` find the composition's values.

    >>> cfg = CalmConfig(anchor="org/anchor", augments=["org/aug"], plan=[[0, 3, 7]], options={"every": 4})
    >>> cfg.model_type, cfg.plan
    ('compose_calm', [[0, 3, 7]])
    """

    model_type = "compose_calm"

    def __init__(
        self,
        anchor: str | None = None,
        augments: list[str | None] | None = None,
        plan: list[list[Any]] | None = None,
        options: dict[str, Any] | None = None,
        fingerprints: dict[str, Any] | None = None,
        calm_format_version: int = CALM_FORMAT_VERSION,
        vocab_size: int | None = None,
        max_position_embeddings: int | None = None,
        cross_tokenizers: list[dict[str, Any] | None] | None = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("tie_word_embeddings", False)  # the anchor ties its own weights, if at all
        super().__init__(**kwargs)
        self.anchor = anchor
        self.augments = list(augments or [])
        self.plan = [list(p) for p in plan or []]
        self.options = dict(options or {})
        self.fingerprints = fingerprints or {}
        self.calm_format_version = calm_format_version
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.cross_tokenizers = list(cross_tokenizers) if cross_tokenizers else None

    def check_version(self, where: str = "the config") -> None:
        """``ValueError`` when ``where`` was written by a newer compose (a layout this one cannot read)."""
        version = self.calm_format_version
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"{where}: calm_format_version {version!r} is not a valid version (expected 1..)")
        if version > CALM_FORMAT_VERSION:
            raise ValueError(
                f"{where} was written in CALM format version {version}; this compose reads versions up to "
                f"{CALM_FORMAT_VERSION}. Upgrade compose (pip install -U compose) to load it"
            )

    @classmethod
    def from_models(
        cls,
        anchor: PreTrainedModel,
        augments: list[PreTrainedModel],
        plan: list[tuple[int, int, int | str]],
        options: dict[str, Any],
        cross_tokenizers: list[dict[str, Any] | None] | None = None,
    ) -> CalmConfig:
        """A config for a composition of these (already loaded) models."""
        anchor_cfg = anchor.config
        return cls(
            anchor=_source(anchor),
            augments=[_source(a) for a in augments],
            plan=[list(p) for p in plan],
            options=options,
            fingerprints={"anchor": fingerprint(anchor), "augments": [fingerprint(a) for a in augments]},
            vocab_size=anchor_cfg.vocab_size,
            max_position_embeddings=getattr(anchor_cfg, "max_position_embeddings", None)
            or getattr(anchor_cfg, "n_positions", None),
            bos_token_id=getattr(anchor_cfg, "bos_token_id", None),
            eos_token_id=getattr(anchor_cfg, "eos_token_id", None),
            pad_token_id=getattr(anchor_cfg, "pad_token_id", None),
            cross_tokenizers=cross_tokenizers if cross_tokenizers and any(cross_tokenizers) else None,
        )


def _source(model: PreTrainedModel) -> str | None:
    return getattr(model.config, "_name_or_path", None) or None


def _config_fields(model: PreTrainedModel) -> dict[str, Any]:
    cfg = model.config.get_text_config(decoder=True)
    return {k: getattr(cfg, k) for k in _CONFIG_FIELDS if isinstance(getattr(cfg, k, None), (int, str))}


@torch.no_grad()
def _tensor_hash(model: PreTrainedModel, sample: int = 512) -> str:
    """sha256 over the first ``sample`` values of the embeddings, the first and the last block.

    Values are rounded to bfloat16 first, so that the same model loaded in fp32, fp16 or
    bf16 gives the same hash, while a differently trained (or seeded) model does not.
    """
    blocks = arch.get_blocks(model)
    picks = [("embed", model.get_input_embeddings().weight)]
    for name, block in (("first", blocks[0]), ("last", blocks[-1])):
        params = [p for p in block.parameters() if p.ndim >= 2]
        if params:
            picks.append((name, params[0]))
    digest = hashlib.sha256()
    for name, t in picks:
        values = t.detach().reshape(-1)[:sample].to("cpu", torch.float32).to(torch.bfloat16)
        digest.update(name.encode())
        digest.update(values.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:32]


def _shapes_hash(model: PreTrainedModel) -> str:
    shapes = sorted((n, list(p.shape)) for n, p in model.named_parameters())
    return hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:32]


def fingerprint(model: PreTrainedModel) -> dict[str, Any]:
    """What identifies a base model: its name, config fields, parameter shapes and a hash of a few tensors."""
    return {
        "name": _source(model),
        "config": _config_fields(model),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "shapes": _shapes_hash(model),
        "tensors": _tensor_hash(model),
    }


def compare_fingerprints(saved: dict[str, Any], model: PreTrainedModel, what: str, directory: str) -> None:
    """``ValueError`` naming the first difference between a saved fingerprint and ``model``'s."""
    if not saved:
        return
    given = fingerprint(model)
    for key, value in saved.get("config", {}).items():
        if given["config"].get(key) != value:
            raise ValueError(
                f"the {what} does not fit {directory}: it was saved with {key}={value!r}, the given model has "
                f"{key}={given['config'].get(key)!r} (fingerprint mismatch). Load the base model the composition "
                "was trained on"
            )
    for key, label in (("num_parameters", "parameter count"), ("shapes", "parameter shapes"), ("tensors", "weights")):
        if key in saved and saved[key] != given[key]:
            raise ValueError(
                f"the {what} does not fit {directory}: its {label} differ from the model the composition was "
                f"saved with (fingerprint mismatch: saved {saved[key]!r}, given {given[key]!r}). Load the base "
                f"model it was trained on ({saved.get('name') or 'name not recorded'})"
            )
