"""YAML recipes: a validated schema, ``key=value`` overrides, multi-stage runs.

A recipe names the models, the strategy and its options, the data, the training
options, the evaluation sets and where the result goes::

    # compose train recipes/tiny/block_expand.yaml train.max_steps=20
    anchor: tiny:llama
    strategy: block_expand
    options: {num_blocks: 2}
    data: {train: recipes/tiny/data/code.txt, seq_len: 64}
    train: {max_steps: 50, learning_rate: 1e-3, batch_size: 4}
    eval:
      perplexity: {general: recipes/tiny/data/general.txt, code: recipes/tiny/data/code.txt}
    output: {dir: runs/tiny_block_expand}

Keys are checked by an OmegaConf structured config, so a misspelt key anywhere is an
error naming it and the valid keys; values go through :mod:`compose.validation`, the
same typed layer as the API, so a recipe accepts exactly what ``Composer``/``fit`` do. The ``train`` section is generated from
:class:`compose.train.TrainConfig`, so the two cannot drift; the data options of
``TrainConfig`` (``seq_len``, ``packing``, ``mask_prompt``, ``text_field``) live in
``data`` and ``output_dir`` is ``output.dir``.

**Stages** (LLaMA Pro: expansion training, then full SFT): ``stages`` is a list of
partial recipes, each merged over the top level. A stage that names another strategy
starts with that strategy's default options; a stage after the first that names no
``anchor`` starts from the previous stage's result (``<output.dir>/<previous>/final``).
Stage ``k`` writes to ``<output.dir>/<stage name>``.

**Overrides** (``load_recipe(path, ["train.max_steps=2"])``, or ``compose train RECIPE
k=v ...``) win everywhere: a key set inside a stage is overridden there too. Address a
single stage with ``stages.1.train.learning_rate=1e-5``.

**Test stand-ins**: an ``anchor``/``augment`` of the form ``tiny:FAMILY`` or
``tiny:FAMILY?hidden=48&layers=2&seed=1`` is a tiny random model from
:func:`compose.testing.tiny_from_spec`, with a character-level tokenizer; recipes under
``recipes/tiny`` use them so that they run anywhere in seconds. They are resolved only
here, never by :class:`~compose.Composer`.

The package: ``schema`` (sections and their validation), ``overrides``, ``stages``
(reading a recipe), ``check`` (``check_recipe``), ``models`` (``tiny:`` and saved
outputs), ``sources`` (data), ``runner`` (``run_recipe``).
"""

from __future__ import annotations

from ..data import _is_main_process, _load_source, build_data
from ..testing import tiny_tokenizer
from .check import check_recipe
from .models import load_output, resolve_model
from .runner import RECIPE_FILE, run_recipe
from .schema import (
    DataSection,
    EvalSection,
    LmEvalSection,
    OutputSection,
    RecipeError,
    RecipeSchema,
    TrainSection,
    train_config,
)
from .stages import Recipe, Stage, load_recipe

__all__ = [
    "RecipeError",
    "Recipe",
    "Stage",
    "load_recipe",
    "check_recipe",
    "run_recipe",
    "resolve_model",
    "tiny_tokenizer",
    "load_output",
    "build_data",
    "train_config",
    "RECIPE_FILE",
    "RecipeSchema",
    "DataSection",
    "TrainSection",
    "EvalSection",
    "LmEvalSection",
    "OutputSection",
    "_is_main_process",
    "_load_source",
]
