"""Export a trained Composer as a plain transformers checkpoint (no compose, no peft needed to load it).

* ``lora``: adapters merged into a copy of the anchor's weights;
* ``block_expand`` / ``full``: the model as is (it already is a plain model);
* ``calm``: not possible - the composition is two models plus cross-attention, which no
  stock transformers class represents.

The tokenizer (when known) and the recipe that produced the model (``recipe.yaml``, when
the source directory has one) are copied beside the weights, with a model card
(``README.md``, see :mod:`compose.publish`) that carries the source run's evaluation table.
``max_shard_size`` splits the weights into safetensors shards with an index.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .io import atomic_directory
from .publish import CardInfo, card_is_foreign, check_shard_size, write_model_card
from .strategies import Strategy

__all__ = ["export_plain"]


def export_plain(
    composer,
    directory: str | os.PathLike,
    *,
    source_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
) -> Path:
    """Write ``composer``'s model to ``directory`` as a checkpoint ``AutoModelForCausalLM`` loads.

    ``directory`` must be new, empty or an earlier export; other files there are an error
    unless ``overwrite=True`` (they are then kept, and only compose's files are replaced).
    """
    strategy = composer.strategy
    max_shard_size = check_shard_size(max_shard_size)
    if not strategy.saves_full_model and type(strategy).export is Strategy.export:
        strategy.export(composer.model, directory)  # raises: nothing to export, nothing written
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite, what="export directory") as tmp:
        strategy.export(composer.model, tmp, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
        if composer.tokenizer is not None:
            composer.tokenizer.save_pretrained(tmp)
        if source_dir is not None and (Path(source_dir) / "recipe.yaml").is_file():
            shutil.copy2(Path(source_dir) / "recipe.yaml", tmp / "recipe.yaml")
        if not card_is_foreign(directory):
            info = CardInfo.from_composer(composer, exported=True)
            if source_dir is not None:
                info.add_run_files(source_dir)
            write_model_card(tmp, info)
    return directory
