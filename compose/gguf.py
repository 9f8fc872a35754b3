"""GGUF files as model sources: dequantized once into a plain transformers folder.

Many small models ship as GGUF (llama.cpp's format). transformers reads a GGUF file with
``from_pretrained(folder, gguf_file=name)`` and dequantizes it, but the model it returns
carries a quantizer marker that makes ``save_pretrained`` refuse, and dequantizing costs
seconds to minutes on every load. compose converts a file once:

* :func:`import_gguf` writes the dequantized model and its tokenizer to a folder of your
  choice (``compose import-gguf FILE OUT``);
* :func:`gguf_folder` does the same into a cache keyed by the file's path, size and
  modification time, and is what ``Composer("model.gguf", ...)`` uses, so a ``.gguf`` file
  works wherever a model directory does (anchor, augment, tokenizer).

The folder reloads with logits identical to the GGUF load (tested). Reading GGUF needs the
``gguf`` package (``pip install gguf``, or the ``gguf`` extra of compose).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

__all__ = ["import_gguf", "gguf_folder", "is_gguf", "cache_root"]

_DONE = "gguf_source.json"


def is_gguf(source: object) -> bool:
    """Whether ``source`` names a ``.gguf`` file (existing or not)."""
    return isinstance(source, (str, os.PathLike)) and str(source).lower().endswith(".gguf")


def cache_root() -> Path:
    """Where converted GGUF folders live: ``$COMPOSE_CACHE/gguf`` or ``~/.cache/compose/gguf``."""
    base = os.environ.get("COMPOSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "compose")
    return Path(base) / "gguf"


def _check_file(file: str | os.PathLike) -> Path:
    path = Path(file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(file)!r} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{str(file)!r} is not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError(
            f"reading {str(file)!r} needs the 'gguf' package: pip install gguf (or pip install 'compose-llm[gguf]')"
        ) from None
    return path.resolve()


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name (e.g. 'float32'), got {dtype!r}")
    return value


def _drop_quantizer(model) -> None:
    """Make a dequantized GGUF model an ordinary one (``save_pretrained`` refuses it otherwise)."""
    for obj, attr in ((model, "hf_quantizer"), (model.config, "quantization_config")):
        if hasattr(obj, attr):
            try:
                delattr(obj, attr)
            except AttributeError:
                setattr(obj, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def import_gguf(
    file: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype | str = "float32",
    overwrite: bool = False,
    verbose: bool = True,
) -> Path:
    """Dequantize a GGUF file into ``out``: ``config.json``, safetensors weights and the tokenizer.

    ``out`` is written atomically (a killed conversion leaves no half folder) and only where
    compose may write (a folder it created, or an empty one; ``overwrite=True`` replaces one
    it did not write). transformers prints a progress bar while it dequantizes.

    >>> import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")   # doctest: +SKIP
    PosixPath('smollm2')
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .io import atomic_directory, write_json

    path = _check_file(file)
    say = print if verbose else (lambda *a, **k: None)
    say(f"compose: dequantizing {path.name} ({path.stat().st_size / 2**20:.0f} MB) ...", flush=True)
    folder, name = str(path.parent), path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=_torch_dtype(dtype))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"transformers could not read {str(file)!r} as a causal LM: {e}") from e
    _drop_quantizer(model)
    model.config._name_or_path = str(path)
    out = Path(out)
    say(f"compose: writing {out} ...", flush=True)
    with atomic_directory(out, overwrite=overwrite, what="GGUF import folder") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stat = path.stat()
        write_json(tmp / _DONE, {"file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return out


def gguf_folder(file: str | os.PathLike, *, verbose: bool = True) -> Path:
    """The cached plain folder for ``file``, converting it on first use (see :func:`import_gguf`).

    The cache key is the file's absolute path, size and modification time, so an edited or
    replaced file is converted again; the weights are kept in float32 (cast on load).
    """
    path = _check_file(file)
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_root() / f"{path.stem}-{key}"
    if (folder / _DONE).is_file() and (folder / "config.json").is_file():
        return folder
    return import_gguf(path, folder, overwrite=True, verbose=verbose)
