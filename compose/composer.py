"""The :class:`Composer`: load models, apply a strategy, fit / evaluate / generate / save / load."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from . import __version__, arch
from .gguf import gguf_folder, is_gguf
from .guards import (
    check_causal_lm,
    check_finite_weights,
    check_not_meta,
    check_text_records,
    check_tokenizer_on_text,
)
from .io import (
    LOCK_NAME,
    RUN_MARKER,
    atomic_directory,
    check_replaceable,
    check_safetensors,
    mark_complete,
    output_lock,
    prepare_run_directory,
    read_json,
    recover_directory,
    write_json,
)
from .strategies import STRATEGIES, StrategyConfig, get_strategy, make_config
from .validation import (
    OptionError,
    check_data_file,
    check_strategy_against_model,
    check_token_ids,
    check_tokenizer_vocabulary,
    validate_generate_inputs,
    validate_generate_options,
    validate_strategy_options,
    validate_train_options,
    vocab_size,
)

__all__ = ["Composer", "load_model"]

CONFIG_NAME = "compose.json"
FORMAT_VERSION = 1


def _is_local_path_like(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or os.sep != "/" and os.sep in s


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
            model = model.to(dtype=_as_dtype(dtype))
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
            src, dtype=_as_dtype(dtype) if dtype is not None else "auto", **kwargs
        )
    except OSError as e:
        raise OSError(
            f"could not load a causal LM from {src!r}: not a local directory, and the hub id could not be "
            f"fetched or is not cached ({e})"
        ) from e
    return model, src


def _check_meta(path: Path, meta: Any) -> None:
    """``compose.json`` must be an object naming the strategy, its options and its saved state."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds a JSON {type(meta).__name__}, not the object Composer.save writes")
    expected = {"strategy": str, "options": dict, "state": dict}
    for key, kind in expected.items():
        if not isinstance(meta.get(key), kind):
            found = "is missing" if key not in meta else f"is {meta[key]!r:.40}"
            raise ValueError(
                f"{path}: {key!r} {found}; expected a {kind.__name__}. The file was edited or damaged: restore "
                "it as Composer.save wrote it"
            )


def _is_calm_directory(directory: Path) -> bool:
    config = directory / "config.json"
    return config.is_file() and read_json(config).get("model_type") == "compose_calm"


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise OptionError(
                f"dtype={dtype} is not accepted; expected a floating-point dtype: torch.float32, torch.bfloat16 or "
                "torch.float16 (or 'float32', 'bfloat16', 'float16'); quantized loading goes through from_pretrained"
            )
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def _find_tokenizer(sources: list[str | None]):
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


def _is_rank_zero() -> bool:
    """The process that owns the output directory (the only one under ``accelerate launch``)."""
    return os.environ.get("RANK", "0") in ("0", "")


class Composer:
    """Augment a frozen anchor model with a strategy, then train, evaluate, generate and save.

    Args:
        anchor: hub id, local checkpoint directory, or a loaded ``PreTrainedModel``.
        augment: augmenting model(s) for strategies that take them (``calm``): same forms,
            or a list of them.
        strategy: a registered strategy name (see ``compose.STRATEGIES``) or a strategy
            config object; ``**options`` are that strategy's options.
        tokenizer: a tokenizer, or a path/hub id to load one from; by default the one saved
            beside the anchor, if any.
        augment_tokenizer: (``calm``) the augmenting model's own tokenizer (object or path/hub
            id; a list with one entry per augmenting model, ``None`` for the default). By default
            the one saved beside each augmenting model; one whose vocabulary differs from the
            anchor's makes that model read the text with its own tokenizer (see docs/calm.md).
        copy_model: a loaded model passed in is deep-copied so that it is never mutated (this
            costs one copy of its weights in memory). Pass ``False`` to let compose take the
            object over and modify it in place, or pass a path so that compose loads the
            model itself and no copy is made.
        dtype: load (or cast) the base models to this dtype (``"bfloat16"`` etc.).

    >>> from compose import Composer
    >>> from compose.testing import tiny_model
    >>> c = Composer(tiny_model("llama"), strategy="block_expand", num_blocks=2)
    >>> sorted({n.split(".")[2] for n, p in c.model.named_parameters() if p.requires_grad})
    ['2', '5']
    """

    def __init__(
        self,
        anchor: str | os.PathLike | PreTrainedModel,
        augment: Any = None,
        *,
        strategy: str | StrategyConfig = "block_expand",
        tokenizer: Any = None,
        augment_tokenizer: Any = None,
        copy_model: bool = True,
        dtype: torch.dtype | str | None = None,
        **options: Any,
    ):
        self.strategy_name, config = self._resolve_strategy(strategy, options)
        strategy_cls = get_strategy(self.strategy_name)
        augments_in = [] if augment is None else list(augment) if isinstance(augment, (list, tuple)) else [augment]
        if strategy_cls.takes_augment and not augments_in:
            raise ValueError(
                f"strategy {self.strategy_name!r} needs an augmenting model: Composer(anchor, augment, ...)"
            )
        if not strategy_cls.takes_augment and augments_in:
            raise ValueError(f"strategy {self.strategy_name!r} takes no augmenting model")
        if not isinstance(copy_model, bool):
            raise OptionError(f"copy_model={copy_model!r} is not accepted; expected true/false")
        if dtype is not None:
            _as_dtype(dtype)
        self.strategy = strategy_cls(config)
        anchor, anchor_kwargs = self._resolve_source(anchor, "anchor")
        anchor_model, self.anchor_source = load_model(anchor, copy_model=copy_model, dtype=dtype, **anchor_kwargs)
        check_causal_lm(anchor_model, "anchor")
        check_strategy_against_model(self.strategy_name, config, anchor_model.config)
        loaded = []
        for i, a in enumerate(augments_in):
            a, kwargs = self._resolve_source(a, "augment")
            loaded.append(load_model(a, copy_model=copy_model, dtype=dtype, **kwargs))
            check_causal_lm(loaded[-1][0], f"augmenting model {i}")
        augments = [m for m, _ in loaded]
        self.augment_sources = [s for _, s in loaded]
        self._base_configs = [anchor_model.config] + [m.config for m in augments]
        self.tokenizer = self._resolve_tokenizer(tokenizer, [self.anchor_source])
        check_tokenizer_vocabulary(self.tokenizer, anchor_model)
        self._pass_augment_tokenizers(augment_tokenizer, anchor_model, augments)
        self.model: nn.Module = self.strategy.build(anchor_model, augments)
        self.model.eval()
        self.history: list[dict[str, float]] = []
        #: names of the training data, for the model card (set by ``fit`` or a recipe).
        self.data_names: list[str] = []

    # ------------------------------------------------------------------ construction helpers
    def _pass_augment_tokenizers(self, given: Any, anchor_model: Any, augments: list) -> None:
        """Resolve ``augment_tokenizer=`` (one per augmenting model) and hand it to the strategy."""
        if not hasattr(self.strategy, "set_tokenizers"):
            if given is not None:
                raise ValueError(f"strategy {self.strategy_name!r} takes no augment_tokenizer")
            return
        given = (
            list(given) if isinstance(given, (list, tuple)) else [given] * len(augments) if given is not None else None
        )
        if given is not None and len(given) != len(augments):
            raise ValueError(
                f"augment_tokenizer has {len(given)} entries for {len(augments)} augmenting model(s); pass one per "
                "augmenting model (None for the default)"
            )
        toks = []
        for i, aug in enumerate(augments):
            tok = given[i] if given is not None else None
            if tok is not None:
                tok = self._resolve_tokenizer(tok, [])
            elif aug.config.vocab_size != anchor_model.config.vocab_size and isinstance(self.augment_sources[i], str):
                tok = _find_tokenizer([self.augment_sources[i]])  # the one saved beside it, if any
            toks.append(tok)
        self.strategy.set_tokenizers(self.tokenizer, toks)

    @staticmethod
    def _resolve_strategy(strategy: str | StrategyConfig, options: dict[str, Any]) -> tuple[str, StrategyConfig]:
        if isinstance(strategy, StrategyConfig):
            if options:
                raise ValueError(f"pass options inside the strategy config, not as keywords: {sorted(options)}")
            for name, cls in STRATEGIES.items():
                if type(strategy) is cls.config_class:
                    values = {f.name: getattr(strategy, f.name) for f in dataclasses.fields(strategy) if f.init}
                    validate_strategy_options(name, values)
                    return name, strategy
            raise ValueError(f"{type(strategy).__name__} belongs to no registered strategy")
        if not isinstance(strategy, str):
            raise TypeError(f"strategy must be a name or a strategy config, got {type(strategy).__name__}")
        return strategy, make_config(strategy, options)

    @staticmethod
    def _resolve_source(source: Any, role: str) -> tuple[Any, dict[str, Any]]:
        """A hub id that cannot be fetched fails now, naming what to do (not after a long network wait)."""
        if (
            not isinstance(source, str)
            or is_gguf(source)
            or Path(source).expanduser().exists()
            or _is_local_path_like(source)
        ):
            return source, {}
        return source, hub_access(source, role)

    @staticmethod
    def _resolve_tokenizer(tokenizer: Any, sources: list[str | None]):
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
        return _find_tokenizer(sources)

    # ------------------------------------------------------------------ public API
    @property
    def config(self) -> StrategyConfig:
        return self.strategy.config

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters training will update, by name."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def fit(self, train_data: Any, eval_data: Any = None, **train_options: Any) -> Composer:
        """Train the strategy's parameters; see :class:`compose.train.TrainConfig` for the options.

        With ``output_dir``, the run holds a lock on the directory (a second live run into it
        is an error), refuses to start over a previous run unless ``resume=True`` or
        ``overwrite_output_dir=True``, and writes ``complete.json`` last.
        """
        return self._fit(train_data, eval_data, train_options)

    def _fit(self, train_data: Any, eval_data: Any, train_options: dict[str, Any], after=None) -> Composer:
        """``fit``; ``after(self)`` runs once the model is trained and saved, before the completion marker."""
        from .train import TrainConfig

        config = TrainConfig.from_kwargs(**validate_train_options(train_options))
        self._check_fit(config, train_data, eval_data)
        if not getattr(self, "data_names", None):
            from .publish import describe_train_data

            self.data_names = describe_train_data(train_data)
        if config.output_dir is None or not _is_rank_zero():
            self._train(config, train_data, eval_data)
            if after is not None:
                after(self)
            return self
        out = Path(config.output_dir)
        created = not out.exists()
        try:
            with output_lock(out):
                recover_directory(out / "final")  # a save interrupted between its renames, by an earlier run
                if config.save_final:
                    check_replaceable(out / "final", what="the final model directory")
                prepare_run_directory(out, resume=config.resume, overwrite=config.overwrite_output_dir)
                self._train(config, train_data, eval_data)
                if after is not None:
                    after(self)
                if config.save_final:
                    mark_complete(out, {"steps": config.max_steps, "strategy": self.strategy_name})
        except BaseException:
            if created and out.is_dir() and {p.name for p in out.iterdir()} <= {LOCK_NAME, RUN_MARKER}:
                shutil.rmtree(out, ignore_errors=True)  # a run that failed before writing anything leaves nothing
            raise
        return self

    def _train(self, config: Any, train_data: Any, eval_data: Any) -> None:
        from .train import train

        def save_model(model: nn.Module, directory: Path) -> None:
            self.model = model
            self.save(directory)

        if getattr(config, "chat_template", None) is not None and self.tokenizer is not None:
            from .chat import with_template

            self.tokenizer = with_template(self.tokenizer, config.chat_template)  # saved with the model

        result = train(
            self.model, train_data, eval_data, config, tokenizer=self.tokenizer, save_model=save_model,
            desc=f"fit {self.strategy_name}",
        )  # fmt: skip
        self.model, self.history = result.model, result.history

    def _check_positions(self, seq_len: int) -> None:
        configs = getattr(self, "_base_configs", None) or [getattr(self.model, "config", None)]
        for role, cfg in zip(["model"] + [f"augmenting model {i}" for i in range(len(configs) - 1)], configs):
            limit = arch.max_positions(cfg) if cfg is not None else None
            if limit is not None and seq_len > limit:
                raise OptionError(
                    f"seq_len={seq_len} is beyond the {role}'s {limit} positions "
                    f"(max_position_embeddings); use seq_len <= {limit}"
                )

    def _check_weights(self, action: str) -> None:
        """NaN/inf anywhere in the weights is named before generating or evaluating (checked once)."""
        if not getattr(self, "_weights_finite", False):
            check_finite_weights(self.model, action)
            self._weights_finite = True

    def _check_fit(self, config: Any, train_data: Any, eval_data: Any) -> None:
        """What can be seen before training starts: positions of every base model, token ids in range."""
        self._check_positions(config.seq_len)
        check_finite_weights(self.model, "train", trainable=False)
        vocab = vocab_size(self.model)
        for name, data in (("train_data", train_data), ("eval_data", eval_data)):
            check_data_file(data, config.text_field)
            check_text_records(data, name, config.text_field)
            check_token_ids(data, vocab, name)
            check_tokenizer_on_text(self.tokenizer, data, name, packing=config.packing, text_field=config.text_field)
            if getattr(self.model, "is_cross_tokenizer", False):
                from .strategies.calm.xtok import check_text_data

                check_text_data(data, name)

    def evaluate(self, eval_data: Any, *, batch_size: int = 8, seq_len: int | None = None, **kwargs: Any) -> dict:
        """Loss and perplexity of the composed model on ``eval_data`` (same forms as ``fit``)."""
        from .evaluate import evaluate_loss

        check_data_file(eval_data, kwargs.get("text_field", "text"))
        check_text_records(eval_data, "eval_data", kwargs.get("text_field", "text"))
        self._check_weights("evaluate")  # batch size and positions: evaluate_loss
        return evaluate_loss(self, eval_data, batch_size=batch_size, seq_len=seq_len, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """``transformers``' own ``generate`` on the composed model, in eval mode.

        Every strategy's model is a transformers model (``calm``: ``CalmForCausalLM`` over its
        composite cache), so every ``generate`` option works: sampling, beam search,
        ``min_new_tokens``, ``repetition_penalty``, ``stop_strings`` (with ``tokenizer=``; the
        Composer's tokenizer is passed when it has one), streamers, ``return_dict_in_generate``.
        """
        validate_generate_inputs(input_ids, attention_mask, vocab=vocab_size(self.model))
        self._check_weights("generate")
        kwargs = validate_generate_options(
            kwargs, prompt_length=input_ids.shape[-1], max_positions=arch.max_positions(self.model.config)
        )
        if "stop_strings" in kwargs and "tokenizer" not in kwargs and self.tokenizer is not None:
            kwargs["tokenizer"] = self.tokenizer
        was_training = self.model.training
        self.model.eval()
        try:
            device = next(self.model.parameters()).device
            input_ids = input_ids.to(device)
            if attention_mask is not None:
                attention_mask = attention_mask.to(device)
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self.model.train(was_training)

    def save(
        self,
        directory: str | os.PathLike,
        *,
        extra: dict[str, Any] | None = None,
        overwrite: bool = False,
        max_shard_size: int | str | None = None,
    ) -> Path:
        """Write what the strategy needs to rebuild the model, atomically, plus ``compose.json`` and a model card.

        ``directory`` must be new, empty, or written by compose before; a directory holding other
        files is an error unless ``overwrite=True``, and even then only compose's files are
        replaced (the others are kept, a ``README.md`` of your own included). Non-finite
        trainable weights are never saved. ``max_shard_size`` (``"5GB"``) splits full-model
        weights (``block_expand``, ``full``) into safetensors shards with an index.
        """
        from .publish import CardInfo, card_is_foreign, check_shard_size, write_model_card

        directory = Path(directory)
        if not isinstance(overwrite, bool):
            raise OptionError(f"overwrite={overwrite!r} is not accepted; expected true/false")
        max_shard_size = check_shard_size(max_shard_size)
        check_not_meta(self.model, f"save {directory}")
        bad = [n for n, p in self.trainable_parameters().items() if not torch.isfinite(p.detach()).all()]
        if bad:
            raise ValueError(
                f"refusing to save {directory}: trainable parameter(s) {', '.join(bad[:3])} hold NaN or inf "
                "(training diverged); lower the learning rate or resume from an earlier checkpoint"
            )
        with atomic_directory(directory, overwrite=overwrite, what="save directory") as tmp:
            shards = (
                {} if max_shard_size is None else {"max_shard_size": max_shard_size}
            )  # older strategies: no keyword
            state = self.strategy.save(self.model, tmp, **shards)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            if not card_is_foreign(directory):
                write_model_card(tmp, CardInfo.from_composer(self))
            write_json(
                tmp / CONFIG_NAME,
                {
                    "format": FORMAT_VERSION,
                    "compose_version": __version__,
                    "strategy": self.strategy_name,
                    "options": self.strategy.config.to_dict(),
                    "anchor": self.anchor_source,
                    "augment": self.augment_sources,
                    "data": list(getattr(self, "data_names", []) or []),
                    "state": state,
                    **(extra or {}),
                },
            )
        return directory

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        max_shard_size: int | str | None = "5GB",
        create_pr: bool = False,
    ) -> str:
        """Save into a temporary directory (weights in ``max_shard_size`` shards, the model card naming
        ``repo_id``) and upload it to the Hub repository ``repo_id``, created if missing; returns the commit URL.

        Needs a Hub token (``token=`` or ``huggingface-cli login``). See :func:`compose.publish.push_to_hub`.
        """
        import tempfile

        from .publish import CardInfo, push_to_hub, write_model_card

        with tempfile.TemporaryDirectory(prefix="compose-push-") as tmp:
            out = self.save(Path(tmp) / "model", max_shard_size=max_shard_size)
            write_model_card(out, CardInfo.from_composer(self, repo_id=repo_id))
            return push_to_hub(
                out, repo_id, private=private, token=token, revision=revision, commit_message=commit_message,
                create_pr=create_pr,
            )  # fmt: skip

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        anchor: Any = None,
        augment: Any = None,
        tokenizer: Any = None,
        copy_model: bool = True,
        dtype: torch.dtype | str | None = None,
    ) -> Composer:
        """Rebuild a Composer from a directory written by :meth:`save`.

        Strategies that save only what they trained (``calm``, ``lora``) reload their base
        models from the sources recorded at save time, or from ``anchor=``/``augment=``.
        """
        directory = Path(directory)
        meta_path = directory / CONFIG_NAME
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory} does not exist or is not a directory")
        recover_directory(directory)
        for weights in sorted(directory.glob("*.safetensors")):
            check_safetensors(weights)
        if not meta_path.is_file() and _is_calm_directory(directory):
            return cls._load_calm_pretrained(directory, anchor, augment, tokenizer, dtype, copy_model)
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}: it was not written by Composer.save")
        meta = read_json(meta_path)
        _check_meta(meta_path, meta)
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{meta_path} has format {meta.get('format')!r}; this compose reads {FORMAT_VERSION}")
        self = cls.__new__(cls)
        self.strategy_name = meta["strategy"]
        self.strategy = get_strategy(self.strategy_name)(make_config(self.strategy_name, meta["options"]))
        self.history = []
        self.data_names = list(meta.get("data") or [])
        if self.strategy.saves_full_model:
            anchor_model, self.anchor_source = None, meta.get("anchor")
            augments, self.augment_sources = [], []
        else:
            anchor_src = anchor if anchor is not None else meta.get("anchor")
            if anchor_src is None:
                raise ValueError(f"{meta_path} names no anchor model; pass anchor= to Composer.load")
            anchor_model, self.anchor_source = load_model(anchor_src, copy_model=copy_model, dtype=dtype)
            aug_srcs = augment if augment is not None else meta.get("augment") or []
            aug_srcs = list(aug_srcs) if isinstance(aug_srcs, (list, tuple)) else [aug_srcs]
            if any(a is None for a in aug_srcs):
                raise ValueError(f"{meta_path} does not name every augmenting model; pass augment= to Composer.load")
            loaded = [load_model(a, copy_model=copy_model, dtype=dtype) for a in aug_srcs]
            augments = [m for m, _ in loaded]
            self.augment_sources = [s for _, s in loaded]
        if self.strategy.saves_full_model and not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"{directory} has no config.json: the saved model is incomplete (deleted or not copied); "
                "save it again, or copy the whole directory"
            )
        self.model = self.strategy.load(directory, meta.get("state", {}), anchor_model, augments)
        if dtype is not None and anchor_model is None:
            self.model.to(dtype=_as_dtype(dtype))
        if anchor_model is not None:
            self._base_configs = [anchor_model.config] + [m.config for m in augments]
        self.model.eval()
        self.tokenizer = self._resolve_tokenizer(tokenizer, [str(directory), self.anchor_source])
        check_tokenizer_vocabulary(self.tokenizer, self.model)
        return self

    @classmethod
    def _load_calm_pretrained(
        cls, directory: Path, anchor: Any, augment: Any, tokenizer: Any, dtype: Any, copy_model: bool
    ) -> Composer:
        """A Composer around ``CalmForCausalLM.from_pretrained(directory)`` (a ``save_pretrained`` directory)."""
        from .strategies.calm import CalmForCausalLM, CalmOptions

        def own(m):  # the caller's model objects are never mutated unless copy_model=False
            return copy.deepcopy(m) if copy_model and isinstance(m, PreTrainedModel) else m

        augments = None if augment is None else list(augment) if isinstance(augment, (list, tuple)) else [augment]
        anchor, augments = own(anchor), None if augments is None else [own(a) for a in augments]
        options = {"dtype": _as_dtype(dtype)} if dtype is not None else {}
        model = CalmForCausalLM.from_pretrained(directory, anchor=anchor, augments=augments, **options)
        self = cls.__new__(cls)
        self.strategy_name = "calm"
        self.strategy = get_strategy("calm")(CalmOptions(**model.config.options))
        self.strategy.plan = list(model.plan)
        self.history = []
        self.data_names = []
        self.model = model
        self.anchor_source = model.config.anchor
        self.augment_sources = list(model.config.augments)
        self.tokenizer = self._resolve_tokenizer(tokenizer, [str(directory), self.anchor_source])
        return self

    def __repr__(self) -> str:
        n_train = sum(p.numel() for p in self.trainable_parameters().values())
        n_all = sum(p.numel() for p in self.model.parameters())
        return (
            f"Composer(strategy={self.strategy_name!r}, anchor={self.anchor_source!r}, "
            f"trainable={n_train:,} of {n_all:,} parameters)"
        )
