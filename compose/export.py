"""Export a trained Composer as a plain transformers checkpoint (no compose, no peft needed to load it).

* ``lora``: adapters merged into a copy of the anchor's weights;
* ``block_expand`` / ``full``: the model as is (it already is a plain model);
* ``calm``: not possible - the composition is two models plus cross-attention, which no
  stock transformers class represents.

The tokenizer (when known) and the recipe that produced the model (``recipe.yaml``, when
the source directory has one) are copied beside the weights.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .io import atomic_directory

__all__ = ["export_plain"]


def export_plain(composer, directory: str | os.PathLike, *, source_dir: str | os.PathLike | None = None) -> Path:
    """Write ``composer``'s model to ``directory`` as a checkpoint ``AutoModelForCausalLM`` loads."""
    strategy = composer.strategy
    exporter = getattr(strategy, "export", None)
    if exporter is None and not strategy.loads_anchor_from_directory():
        raise ValueError(
            f"strategy {composer.strategy_name!r} has no plain-checkpoint export: its model is not a single "
            "transformers model (load it with Composer.load instead)"
        )
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        if exporter is not None:
            exporter(composer.model, tmp)
        else:
            composer.model.save_pretrained(tmp, safe_serialization=True)
        if composer.tokenizer is not None:
            composer.tokenizer.save_pretrained(tmp)
        if source_dir is not None and (Path(source_dir) / "recipe.yaml").is_file():
            shutil.copy2(Path(source_dir) / "recipe.yaml", tmp / "recipe.yaml")
    return directory
