"""Loading base models and tokenizers: hub ids, local directories, GGUF files, loaded objects.

Everything that reaches for a checkpoint goes through here, so that a source that cannot be
had fails at once with what to do (a missing directory, a hub id offline or unreachable),
and a model passed in is copied rather than mutated.
"""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .gguf import gguf_folder, is_gguf
from .paths import looks_local
from .rules import OptionError

__all__ = [
    "load_model",
    "hub_access",
    "as_dtype",
    "DTYPES",
    "resolve_source",
    "resolve_tokenizer",
    "find_tokenizer",
    "augment_tokenizers",
]

#: dtype names accepted wherever a dtype is given as text (``Composer(dtype=...)``, a recipe's ``dtype``).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _is_local_path_like(s: str) -> bool:
    return looks_local(s)  # one rule for models, tokenizers and data: compose.paths


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
            model = model.to(dtype=as_dtype(dtype))
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
    if is_gguf(src):  # dequantized once into a cached plain folder
        model, _ = load_model(gguf_folder(path), copy_model=copy_model, dtype=dtype, **kwargs)
        return model, str(path.resolve())
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"{src!r} is a file; give the directory holding config.json and the weights (or a .gguf file)"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{src!r} has no config.json: is it a transformers checkpoint directory?")
        src = str(path)
    elif isinstance(source, os.PathLike) or _is_local_path_like(src):
        raise FileNotFoundError(f"model directory {src!r} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=as_dtype(dtype) if dtype is not None else "auto", **kwargs
        )
    except OSError as e:
        raise OSError(
            f"could not load a causal LM from {src!r}: not a local directory, and the hub id could not be "
            f"fetched or is not cached ({e})"
        ) from e
    return model, src


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise OptionError(
                f"dtype={dtype} is not accepted; expected a floating-point dtype: torch.float32, torch.bfloat16 or "
                "torch.float16 (or 'float32', 'bfloat16', 'float16'); quantized loading goes through from_pretrained"
            )
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def find_tokenizer(sources: list[str | None]):
    for src in sources:
        if src is None:
            continue
        if is_gguf(src):
            src = str(gguf_folder(src))
        try:
            return AutoTokenizer.from_pretrained(src)
        except Exception:  # noqa: BLE001 - a model without a tokenizer is fine until text is used
            continue
    return None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


_REACHABLE: dict[str, bool] = {}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One short TCP connection to the hub endpoint (cached for the process)."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    if host not in _REACHABLE:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
    return _REACHABLE[host]


def hub_access(repo_id: str, role: str, *, filename: str = "config.json") -> dict[str, Any]:
    """Extra ``from_pretrained`` kwargs for a hub id, or an error at once when it cannot be had.

    Offline (``HF_HUB_OFFLINE``) or with the hub unreachable, a cached copy is used; with no
    cached copy the error names the id and what to do, instead of a long network timeout.
    """
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # noqa: BLE001 - huggingface_hub rejects malformed ids with its own types
        raise ValueError(
            f"{role} {repo_id!r} is not an existing local directory and not a valid hub id (org/name)"
        ) from None
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        if not cached:
            raise OSError(
                f"{role} {repo_id!r} is not a local directory and is not in the hub cache, and HF_HUB_OFFLINE is "
                f"set: download it first with network access (huggingface-cli download {repo_id}), or give a "
                "local checkpoint directory"
            )
        return {}
    if not _hub_reachable():
        if cached:
            return {"local_files_only": True}
        raise OSError(
            f"{role} {repo_id!r} is not a local directory and the hub cannot be reached (no network?): download "
            f"it where there is network (huggingface-cli download {repo_id}) or give a local checkpoint directory"
        )
    return {}


def resolve_source(source: Any, role: str) -> tuple[Any, dict[str, Any]]:
    """A hub id that cannot be fetched fails now, naming what to do (not after a long network wait)."""
    if (
        not isinstance(source, str)
        or is_gguf(source)
        or Path(source).expanduser().exists()
        or _is_local_path_like(source)
    ):
        return source, {}
    return source, hub_access(source, role)


def resolve_tokenizer(tokenizer: Any, sources: list[str | None]):
    if isinstance(tokenizer, (str, os.PathLike)):
        src = str(gguf_folder(tokenizer)) if is_gguf(tokenizer) else str(tokenizer)
        kwargs: dict[str, Any] = {}
        if not Path(src).expanduser().exists():
            if _is_local_path_like(src):
                raise FileNotFoundError(f"tokenizer directory {src!r} does not exist")
            kwargs = hub_access(src, "tokenizer", filename="tokenizer_config.json")
        try:
            return AutoTokenizer.from_pretrained(src, **kwargs)
        except (OSError, ValueError) as e:
            raise OSError(f"could not load a tokenizer from {src!r}: {e}") from e
    if tokenizer is not None:
        if not callable(tokenizer) or not hasattr(tokenizer, "convert_tokens_to_ids"):
            raise TypeError(
                f"tokenizer must be a transformers tokenizer or a path/hub id, got {type(tokenizer).__name__}"
            )
        return tokenizer
    return find_tokenizer(sources)


def augment_tokenizers(given: Any, augments: list, anchor_vocab: int, sources: list) -> list:
    """``augment_tokenizer=`` resolved to one tokenizer (or ``None``) per augmenting model.

    ``None`` for a model means the one saved beside it when its vocabulary differs from the
    anchor's (``anchor_vocab`` tokens), else none.
    """
    given = list(given) if isinstance(given, (list, tuple)) else [given] * len(augments) if given is not None else None
    if given is not None and len(given) != len(augments):
        raise ValueError(
            f"augment_tokenizer has {len(given)} entries for {len(augments)} augmenting model(s); pass one per "
            "augmenting model (None for the default)"
        )
    toks = []
    for i, aug in enumerate(augments):
        tok = given[i] if given is not None else None
        if tok is not None:
            tok = resolve_tokenizer(tok, [])
        elif aug.config.vocab_size != anchor_vocab and isinstance(sources[i], str):
            tok = find_tokenizer([sources[i]])  # the one saved beside it, if any
        toks.append(tok)
    return toks
