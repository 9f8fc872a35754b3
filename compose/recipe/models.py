"""Models named in recipes: ``tiny:`` stand-ins resolved, saved outputs reloaded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..testing import TINY_PREFIX, parse_tiny_spec, tiny_from_spec

__all__ = ["resolve_model", "load_output"]


def resolve_model(source: str, *, dtype: str | None = None):
    """A ``tiny:FAMILY?...`` spec becomes a tiny random model; anything else is returned as is."""
    if not isinstance(source, str) or not source.startswith(TINY_PREFIX):
        return source
    from .schema import RecipeError

    try:
        parse_tiny_spec(source)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    model = tiny_from_spec(source)
    if dtype is not None:
        from ..loading import as_dtype

        model = model.to(dtype=as_dtype(dtype))
    return model


def load_output(directory: str | os.PathLike, **kwargs: Any):
    """``Composer.load(directory)``, rebuilding ``tiny:`` stand-in base models recorded in ``compose.json``.

    An interrupted save of ``directory`` is recovered first (see :func:`compose.io.recover_directory`);
    the ``final/`` of a run that did not finish (no ``complete.json`` beside it) loads with a warning;
    a weights file cut short or damaged is an error naming it.
    """
    import warnings

    from ..composer import CONFIG_NAME, Composer
    from ..io import RUN_MARKER, check_safetensors, is_complete, read_json, recover_directory

    recover_directory(directory)
    for weights in sorted(Path(directory).glob("*.safetensors")):
        check_safetensors(weights)
    run = Path(directory).parent
    if Path(directory).name == "final" and (run / RUN_MARKER).is_file() and not is_complete(run):
        warnings.warn(
            f"compose: the run in {run} did not finish (no complete.json): {directory} may lack its results",
            stacklevel=2,
        )
    meta_path = Path(directory) / CONFIG_NAME
    meta = read_json(meta_path) if meta_path.is_file() else None
    if isinstance(meta, dict):  # anything else is named by Composer.load
        anchor = meta.get("anchor")
        if kwargs.get("anchor") is None and isinstance(anchor, str) and anchor.startswith(TINY_PREFIX):
            kwargs["anchor"] = resolve_model(anchor)
        augments = meta.get("augment") or []
        if kwargs.get("augment") is None and any(isinstance(a, str) and a.startswith(TINY_PREFIX) for a in augments):
            kwargs["augment"] = [resolve_model(a) for a in augments]
    return Composer.load(directory, **kwargs)
