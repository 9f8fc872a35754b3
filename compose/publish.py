"""Publishing a model: shard sizes, a model card, an upload to the Hugging Face Hub.

Every directory :meth:`Composer.save` or ``compose export`` writes carries a model card,
``README.md`` with the Hub's YAML metadata (``base_model``, ``library_name``, ``tags``,
``datasets``) above a body that names the method and its paper, the base model(s), the
training data, how to load the model, the evaluation table of the run and the recipe that
produced it. A recipe run re-writes the card once its evaluation is done.

:func:`push_to_hub` uploads such a directory with ``huggingface_hub`` (one commit, compose's
bookkeeping files left out). A ``README.md`` that compose did not write is never replaced.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import LOCK_NAME, MARKER, RUN_MARKER, owned_files, read_json
from .validation import OptionError

__all__ = ["CardInfo", "check_shard_size", "model_card", "write_model_card", "push_to_hub", "describe_sources"]

CARD_NAME = "README.md"
RECIPE_NAME = "recipe.yaml"
RESULTS_NAME = "results.json"
#: never uploaded: compose's ownership marker, run lock and run marker, interrupted-write leftovers.
UPLOAD_IGNORE = [MARKER, LOCK_NAME, RUN_MARKER, ".*.tmp-*", ".*.tmp-*/**", ".*.old-*", ".*.old-*/**"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_shard_size(value: Any, option: str = "max_shard_size") -> int | str | None:
    """``None``, a positive byte count, or a size such as ``"5GB"`` / ``"500MB"``; anything else is an error."""
    if value is None:
        return None
    from transformers.utils.hub import convert_file_size_to_int

    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise OptionError(f"{option}={value!r} is not accepted; expected a size such as '5GB' or a number of bytes")
    try:
        size = convert_file_size_to_int(value)
    except (ValueError, TypeError):
        size = None
    if not isinstance(size, int) or size <= 0:
        raise OptionError(
            f"{option}={value!r} is not accepted; expected a positive size such as '5GB', '500MB' or a number of bytes"
        )
    return value


def is_hub_id(source: Any) -> bool:
    """Whether ``source`` reads as a Hub model id (not a local directory, not a ``tiny:`` stand-in)."""
    if not isinstance(source, str) or not _HUB_ID.match(source) or source.startswith("."):
        return False
    return not Path(source).expanduser().exists()


def describe_sources(sources: Any) -> list[str]:
    """Names of recipe data sources: a file's name (never its full path), a hub dataset id, ``name/config``."""
    if sources is None:
        return []
    items = sources if isinstance(sources, (list, tuple)) else [sources]
    names = []
    for item in items:
        if isinstance(item, dict):
            path, config = item.get("path"), item.get("name")
            base = describe_sources(path)[0] if path is not None else "records"
            names.append(f"{base}/{config}" if config else base)
        elif isinstance(item, (str, os.PathLike)):
            text = str(item)
            names.append(Path(text).name if Path(text).expanduser().exists() or "." in Path(text).name else text)
        else:
            names.append(type(item).__name__)
    return names


def describe_train_data(data: Any) -> list[str]:
    """Names of what ``Composer.fit`` was given (a file, a hub dataset, a ``Dataset``, records in memory)."""
    if isinstance(data, (str, os.PathLike)):
        return describe_sources(data)
    info = getattr(data, "info", None)
    name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    if name:
        return [str(name)]
    try:
        return [f"{len(data):,} in-memory records"]
    except TypeError:
        return []


@dataclass
class CardInfo:
    """What a model card says, gathered from a Composer or from a saved directory."""

    strategy: str
    anchor: str | None = None
    augments: list[str | None] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    exported: bool = False
    """A plain checkpoint written by ``compose export`` (LoRA merged: loads with transformers alone)."""
    recipe: str | None = None
    results: dict[str, Any] | None = None
    repo_id: str | None = None

    @classmethod
    def from_composer(cls, composer: Any, **kwargs: Any) -> CardInfo:
        return cls(
            strategy=composer.strategy_name,
            anchor=composer.anchor_source,
            augments=list(getattr(composer, "augment_sources", []) or []),
            options=composer.strategy.config.to_dict(),
            data=list(getattr(composer, "data_names", []) or []),
            **kwargs,
        )

    def add_run_files(self, directory: str | os.PathLike) -> None:
        """Take the recipe and the evaluation results written beside the model, when there are any."""
        directory = Path(directory)
        if self.recipe is None and (directory / RECIPE_NAME).is_file():
            self.recipe = (directory / RECIPE_NAME).read_text()
        if self.results is None and (directory / RESULTS_NAME).is_file():
            self.results = read_json(directory / RESULTS_NAME)


# ---------------------------------------------------------------------------- the card
def _strategy_class(name: str):
    from .strategies import get_strategy

    return get_strategy(name)


def card_metadata(info: CardInfo):
    """The card's Hub metadata (``huggingface_hub.ModelCardData``)."""
    from huggingface_hub import ModelCardData

    cls = _strategy_class(info.strategy)
    library = "transformers" if info.exported else cls.library_name
    bases = [info.anchor, *info.augments] if cls.takes_augment else [info.anchor]
    hub_bases = [b for b in bases if is_hub_id(b)]
    tags = ["compose", info.strategy.replace("_", "-")]
    tags += {"block_expand": ["llama-pro"], "calm": ["model-composition"], "lora": ["lora"]}.get(info.strategy, [])
    extra: dict[str, Any] = {}
    if info.strategy == "lora" and not info.exported:
        extra["base_model_relation"] = "adapter"
    return ModelCardData(
        base_model=(hub_bases[0] if len(hub_bases) == 1 else hub_bases) or None,
        library_name=library,
        pipeline_tag="text-generation",
        tags=tags,
        datasets=[d for d in info.data if is_hub_id(d) and "/" in d] or None,
        **extra,
    )


def _usage(info: CardInfo, cls) -> str:
    repo = info.repo_id or "path/or/hub-id"
    if info.exported or cls.library_name == "transformers":
        return (
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")\n```\n\n'
            "A plain transformers checkpoint: no compose and no custom code are needed to load it."
        )
    if cls.library_name == "peft":
        return (
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{info.anchor or "BASE_MODEL"}")\n'
            f'model = PeftModel.from_pretrained(base, "{repo}")\n```\n\n'
            "A LoRA adapter; `compose export` writes the merged weights as a plain checkpoint."
        )
    return (
        "```python\nimport compose  # registers the CALM model type with transformers' Auto classes\n"
        "from transformers import AutoModelForCausalLM\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo}")\n```\n\n'
        "**This model needs compose** (`pip install compose-llm`, then `import compose` before loading): it "
        "holds only the trained composition (cross-attention connections); the base models it names are "
        "loaded from their own repositories or folders and checked against the fingerprints in `config.json`."
    )


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def eval_rows(results: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """``(set, metric, after, before)`` rows of a run's ``results.json`` (``before``: the baseline, or empty)."""
    if not results:
        return []
    after, before = results.get("eval") or {}, results.get("baseline") or {}
    wanted = {"perplexity": ("perplexity", "bits_per_byte"), "exact_match": ("accuracy",)}
    rows = []
    for kind, metrics in wanted.items():
        for name, rep in (after.get(kind) or {}).items():
            base = (before.get(kind) or {}).get(name, {})
            rows += [(name, m, _number(rep[m]), _number(base.get(m, ""))) for m in metrics if m in rep]
    for task, scores in (after.get("lm_eval") or {}).items():
        rows += [(task, m, _number(v), "") for m, v in scores.items() if not m.endswith("_stderr")]
    return rows


def _body(info: CardInfo) -> str:
    cls = _strategy_class(info.strategy)
    method = f"[{cls.method}]({cls.paper})" if cls.paper else cls.method
    lines = [f"# {info.repo_id.split('/')[-1] if info.repo_id else info.strategy + ' model'}", ""]
    lines.append(f"Trained with compose by **{method}**.")
    lines.append("")
    lines.append(f"- anchor model: `{info.anchor or 'an in-memory model (not recorded)'}`")
    for i, aug in enumerate(info.augments):
        lines.append(f"- augmenting model {i}: `{aug or 'an in-memory model (not recorded)'}`")
    if info.data:
        lines.append(f"- training data: {', '.join(f'`{d}`' for d in info.data)}")
    shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(info.options.items()) if v is not None)
    lines.append(f"- strategy: `{info.strategy}`" + (f" (`{shown}`)" if shown else ""))
    lines += ["", "## Usage", "", _usage(info, cls)]
    rows = eval_rows(info.results)
    if rows:
        has_before = any(r[3] for r in rows)
        lines += ["", "## Evaluation", ""]
        lines.append("| set | metric | this model |" + (" before training |" if has_before else ""))
        lines.append("|---|---|---|" + ("---|" if has_before else ""))
        lines += [f"| {s} | {m} | {a} |" + (f" {b} |" if has_before else "") for s, m, a, b in rows]
    if info.recipe:
        lines += ["", "## Recipe", "", "The recipe that produced this model (`compose train` reruns it):", ""]
        lines += ["```yaml", info.recipe.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def model_card(info: CardInfo):
    """A ``huggingface_hub.ModelCard``: Hub metadata plus the body described in the module docstring."""
    from huggingface_hub import ModelCard

    return ModelCard(f"---\n{card_metadata(info).to_yaml()}\n---\n\n{_body(info)}")


def card_is_foreign(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a ``README.md`` that compose did not write (it is then never replaced)."""
    card = Path(directory) / CARD_NAME
    return card.exists() and CARD_NAME not in (owned_files(directory) or set())


def write_model_card(directory: str | os.PathLike, info: CardInfo) -> Path:
    from .io import write_text

    path = Path(directory) / CARD_NAME
    write_text(path, str(model_card(info)))
    return path


# ---------------------------------------------------------------------------- the upload
def push_to_hub(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload ``directory`` (a saved or exported model with its card) to the Hub repository ``repo_id``.

    The repository is created when missing. Returns the commit's URL.
    """
    from huggingface_hub import HfApi

    directory = Path(directory)
    if not isinstance(repo_id, str) or not _HUB_ID.match(repo_id) or "/" not in repo_id:
        raise ValueError(f"repo_id {repo_id!r} is not a Hub repository id; expected 'user-or-org/name'")
    if not (directory / "config.json").is_file() and not (directory / "compose.json").is_file():
        raise FileNotFoundError(
            f"{directory} holds no model (no config.json or compose.json): push a directory written by "
            "Composer.save, `compose train` (its final/) or `compose export`"
        )
    if not (directory / CARD_NAME).is_file():
        raise FileNotFoundError(
            f"{directory} has no model card ({CARD_NAME}); save it again with this compose "
            "(Composer.load(dir).save(new_dir)) or write one"
        )
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        raise OSError(f"HF_HUB_OFFLINE is set: cannot push {directory} to {repo_id}; unset it to upload")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(directory),
        revision=revision,
        commit_message=commit_message or f"Upload model trained with compose ({directory.name})",
        ignore_patterns=UPLOAD_IGNORE,
        create_pr=create_pr,
    )
    return str(getattr(commit, "commit_url", commit))
