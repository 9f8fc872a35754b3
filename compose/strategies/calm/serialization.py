"""Saving and loading a CALM composition: config + composition weights, base models by name.

A saved directory holds ``config.json`` (a :class:`CalmConfig`: base model names and
fingerprints, plan, options), ``generation_config.json`` and ``calm.safetensors`` (the
connections only). The safetensors metadata repeats the plan and the options the weights were
trained with, so that a hand-edited config (``num_heads`` changed, say) is refused instead of
silently splitting the weights into different heads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GenerationConfig, PreTrainedModel

from .configuration import CalmConfig, compare_fingerprints

__all__ = [
    "WEIGHTS_NAME",
    "ANCHOR_TOKENIZER_DIR",
    "AUGMENT_TOKENIZER_DIR",
    "save_composition",
    "load_composition",
    "load_bases",
    "load_connection_weights",
]

WEIGHTS_NAME = "calm.safetensors"
#: Folders of a saved cross-tokenizer composition: the anchor's tokenizer, and ``augment_tokenizer_<i>``.
ANCHOR_TOKENIZER_DIR = "anchor_tokenizer"
AUGMENT_TOKENIZER_DIR = "augment_tokenizer"
_LOAD_OPTIONS = ("dtype", "torch_dtype", "device_map", "local_files_only", "revision", "token", "cache_dir")


def _composition_metadata(model) -> dict[str, str]:
    heads = model.connections[0].num_heads if len(model.connections) else None
    return {
        "format": "compose_calm",
        "plan": json.dumps([list(p) for p in model.plan]),
        "options": json.dumps(model.options.to_dict(), sort_keys=True),
        "num_heads": json.dumps(heads),
    }


def save_composition(model, directory: str | os.PathLike) -> Path:
    """Write ``model``'s config, generation config and connection weights into ``directory``."""
    directory = Path(directory)
    tensors = {f"connections.{k}": v.detach().contiguous() for k, v in model.connections.state_dict().items()}
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise ValueError(f"refusing to save non-finite composition weights: {', '.join(bad)}")
    directory.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    save_file(
        {k: v.cpu() for k, v in tensors.items()}, str(directory / WEIGHTS_NAME), metadata=_composition_metadata(model)
    )
    records = model.config.cross_tokenizers or []
    if any(records):
        model.tokenizer.save_pretrained(directory / ANCHOR_TOKENIZER_DIR)
        for i, record in enumerate(records):
            if record is not None:
                model.augment_tokenizers[i].save_pretrained(directory / record["path"])
    return directory


def load_tokenizers(config: CalmConfig, directory: Path, tokenizer: Any = None, augment_tokenizers: Any = None):
    """The anchor and augmenting tokenizers of a cross-tokenizer composition: given, else saved in ``directory``."""
    records = config.cross_tokenizers or []
    if not any(records):
        return None, None
    from transformers import AutoTokenizer

    def load(sub: str, what: str):
        where = directory / sub
        if not where.is_dir():
            raise OSError(
                f"{directory} has no {sub}/ (the {what} of this cross-tokenizer composition); pass it to "
                "from_pretrained (tokenizer= / augment_tokenizers=[...])"
            )
        return AutoTokenizer.from_pretrained(where)

    if tokenizer is None:
        tokenizer = load(ANCHOR_TOKENIZER_DIR, "anchor tokenizer")
    given = list(augment_tokenizers) if augment_tokenizers is not None else [None] * len(records)
    if len(given) != len(records):
        raise ValueError(
            f"{directory} was saved with {len(records)} augmenting model(s); {len(given)} tokenizers given"
        )
    toks = [
        tok if tok is not None or record is None else load(record["path"], f"augmenting model {i}'s tokenizer")
        for i, (tok, record) in enumerate(zip(given, records))
    ]
    return tokenizer, toks


def _load_one(source: Any, what: str, directory: str, options: dict[str, Any]) -> PreTrainedModel:
    """A base model from a loaded object, a hub id or a local directory; a clear error when it cannot be found."""
    if isinstance(source, PreTrainedModel):
        return source
    if source is None:
        raise OSError(
            f"{directory} does not name the {what} (the composition was built from an in-memory model); "
            f"pass it to from_pretrained: anchor=... / augments=[...]"
        )
    from ...loading import load_model

    try:
        model, _ = load_model(source, copy_model=False, **options)
    except (OSError, ValueError) as e:
        raise OSError(
            f"cannot load the {what} {source!r} named in {directory}: {e}. Make it available there, or pass the "
            "model to from_pretrained (anchor=... / augments=[...])"
        ) from e
    return model


def load_bases(
    config: CalmConfig,
    anchor: Any = None,
    augments: list[Any] | None = None,
    directory: str = "the CALM config",
    **options: Any,
) -> tuple[PreTrainedModel, list[PreTrainedModel]]:
    """The anchor and augmenting models a config names (or the given overrides), fingerprint-checked."""
    if augments is not None and not isinstance(augments, (list, tuple)):
        augments = [augments]
    names = list(config.augments)
    if augments is not None and names and len(augments) != len(names):
        raise ValueError(f"{directory} was saved with {len(names)} augmenting model(s); {len(augments)} given")
    anchor_model = _load_one(anchor if anchor is not None else config.anchor, "anchor model", directory, options)
    sources = list(augments) if augments is not None else names
    augment_models = [_load_one(src, f"augmenting model {i}", directory, options) for i, src in enumerate(sources)]
    saved = config.fingerprints or {}
    compare_fingerprints(saved.get("anchor", {}), anchor_model, "anchor model", directory)
    for i, model in enumerate(augment_models):
        prints = saved.get("augments", [])
        if i < len(prints):
            compare_fingerprints(prints[i], model, f"augmenting model {i}", directory)
    return anchor_model, augment_models


def load_connection_weights(model, path: Path, *, check_metadata: bool = True) -> None:
    """Load ``path`` into ``model.connections``; names, shapes and the saved plan/options must match."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} has no {path.name}: it does not hold a CALM composition")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if check_metadata and metadata.get("format") == "compose_calm":
        own = _composition_metadata(model)
        for key in ("plan", "options", "num_heads"):
            if json.loads(metadata[key]) != json.loads(own[key]):
                raise ValueError(
                    f"{path.parent}/config.json does not match {path.name}: the weights were saved with {key} "
                    f"{metadata[key]}, the config gives {own[key]}. Restore the config the weights were saved with"
                )
    own = {f"connections.{k}": v for k, v in model.connections.state_dict().items()}
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the connections: missing {missing}, unexpected {unexpected}")
    for name, tensor in tensors.items():
        if tensor.shape != own[name].shape:
            raise ValueError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the given models need {tuple(own[name].shape)}"
            )
    model.connections.load_state_dict({k.removeprefix("connections."): v for k, v in tensors.items()})


def load_composition(cls, directory: str | os.PathLike, *, anchor=None, augments=None, **kwargs: Any):
    """``CalmForCausalLM.from_pretrained``: config, base models, composition weights."""
    path = Path(directory).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory} has no config.json: give a directory written by CalmForCausalLM.save_pretrained "
            "(or Composer.save with strategy='calm')"
        )
    config = kwargs.pop("config", None)
    if not isinstance(config, CalmConfig):
        raw = json.loads((path / "config.json").read_text())
        if raw.get("model_type") != CalmConfig.model_type:
            raise ValueError(
                f"{path}/config.json has model_type {raw.get('model_type')!r}, not {CalmConfig.model_type!r}: "
                "it is not a CALM composition"
            )
        CalmConfig(calm_format_version=raw.get("calm_format_version", 1)).check_version(str(path))
        config = CalmConfig.from_pretrained(path)
    config.check_version(str(path))
    options = {k: kwargs.pop(k) for k in _LOAD_OPTIONS if k in kwargs}
    if "torch_dtype" in options:  # the older name of dtype
        options.setdefault("dtype", options.pop("torch_dtype"))
    tokenizer, augment_tokenizers = load_tokenizers(
        config, path, kwargs.pop("tokenizer", None), kwargs.pop("augment_tokenizers", None)
    )
    anchor_model, augment_models = load_bases(config, anchor, augments, str(path), **options)
    model = cls(config, anchor_model, augment_models, tokenizer=tokenizer, augment_tokenizers=augment_tokenizers)
    load_connection_weights(model, path / WEIGHTS_NAME)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    return model
