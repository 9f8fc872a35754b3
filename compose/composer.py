"""The :class:`Composer`: load models, apply a strategy, fit / evaluate / generate / save / load.

Loading base models and tokenizers is :mod:`compose.loading`; reading a saved directory back
is :mod:`compose.saved`; what a strategy knows (its options, model checks, tokenizers, saved
format) it declares itself (:mod:`compose.strategies`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from . import arch
from .datachecks import check_data_file, check_tokenizer_vocabulary, vocab_size
from .fitting import check_fit_data, fit_config, run_directory
from .guards import check_causal_lm, check_finite_weights, check_not_meta, check_text_records
from .io import atomic_directory, write_json
from .loading import (
    as_dtype,
    augment_tokenizers,
    hub_access,
    load_model,
    resolve_source,
    resolve_tokenizer,
)
from .rules import OptionError
from .saved import CONFIG_NAME, FORMAT_VERSION, load_composer
from .strategies import StrategyConfig, get_strategy, make_config, strategy_of
from .validation import validate_generate_inputs, validate_generate_options
from .version import __version__

__all__ = ["Composer", "load_model", "hub_access", "CONFIG_NAME", "FORMAT_VERSION"]


def _is_rank_zero() -> bool:
    """The process that owns the output directory (the only one under ``accelerate launch``).

    Read from the launcher's ``RANK`` rather than accelerate's ``PartialState``: this runs before
    training, and creating the state here would set up the process group before the
    accelerator that training builds with its own settings."""
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
            as_dtype(dtype)
        self.strategy = strategy_cls(config)
        anchor, anchor_kwargs = resolve_source(anchor, "anchor")
        anchor_model, self.anchor_source = load_model(anchor, copy_model=copy_model, dtype=dtype, **anchor_kwargs)
        check_causal_lm(anchor_model, "anchor")
        self.strategy.check(anchor_model.config)  # before anything is built (so before memory grows)
        loaded = []
        for i, a in enumerate(augments_in):
            a, kwargs = resolve_source(a, "augment")
            loaded.append(load_model(a, copy_model=copy_model, dtype=dtype, **kwargs))
            check_causal_lm(loaded[-1][0], f"augmenting model {i}")
        augments = [m for m, _ in loaded]
        self.augment_sources = [s for _, s in loaded]
        self._base_configs = [anchor_model.config] + [m.config for m in augments]
        self.tokenizer = resolve_tokenizer(tokenizer, [self.anchor_source])
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
        if not self.strategy.needs_tokenizers:
            if given is not None:
                raise ValueError(f"strategy {self.strategy_name!r} takes no augment_tokenizer")
            return
        toks = augment_tokenizers(given, augments, anchor_model.config.vocab_size, self.augment_sources)
        self.strategy.set_tokenizers(self.tokenizer, toks)

    @staticmethod
    def _resolve_strategy(strategy: str | StrategyConfig, options: dict[str, Any]) -> tuple[str, StrategyConfig]:
        """A name and options become the strategy's config (checked once, as it is built); a config object
        was checked when it was built and is taken as it is."""
        if isinstance(strategy, StrategyConfig):
            if options:
                raise ValueError(f"pass options inside the strategy config, not as keywords: {sorted(options)}")
            return strategy_of(strategy).name, strategy
        if not isinstance(strategy, str):
            raise TypeError(f"strategy must be a name or a strategy config, got {type(strategy).__name__}")
        return strategy, make_config(strategy, options)

    # ------------------------------------------------------------------ public API
    @property
    def config(self) -> StrategyConfig:
        return self.strategy.config

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters training will update, by name."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def fit(
        self,
        train_data: Any,
        eval_data: Any = None,
        *,
        config: Any = None,
        after: Callable[[Composer], None] | None = None,
        **options: Any,
    ) -> Composer:
        """Train the strategy's parameters; see :class:`compose.train.TrainConfig` for the options.

        Give the options as keywords, or as a ``TrainConfig`` (``config=``; keywords then replace
        its fields). With ``output_dir``, the run holds a lock on the directory (a second live run
        into it is an error), refuses to start over a previous run unless ``resume=True`` or
        ``overwrite_output_dir=True``, and writes ``complete.json`` last. ``after(self)`` runs once
        the model is trained and saved, before that marker (a recipe writes its results there).
        """
        config = fit_config(config, options)
        check_fit_data(self, config, train_data, eval_data)
        if not getattr(self, "data_names", None):
            from .publish import describe_train_data

            self.data_names = describe_train_data(train_data)
        if config.output_dir is None or not _is_rank_zero():
            self._train(config, train_data, eval_data)
            if after is not None:
                after(self)
            return self
        with run_directory(Path(config.output_dir), config, self.strategy_name):
            self._train(config, train_data, eval_data)
            if after is not None:
                after(self)
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
        return load_composer(
            cls, directory, anchor=anchor, augment=augment, tokenizer=tokenizer, copy_model=copy_model, dtype=dtype
        )

    def __repr__(self) -> str:
        n_train = sum(p.numel() for p in self.trainable_parameters().values())
        n_all = sum(p.numel() for p in self.model.parameters())
        return (
            f"Composer(strategy={self.strategy_name!r}, anchor={self.anchor_source!r}, "
            f"trainable={n_train:,} of {n_all:,} parameters)"
        )
