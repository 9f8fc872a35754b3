"""The ``calm`` strategy: plan the connections, build a :class:`CalmForCausalLM`, save and load it."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from ... import arch
from ..base import Pretrained, Strategy, register
from .configuration import CalmConfig
from .modeling import CalmForCausalLM
from .options import INPUT, CalmOptions, _local_tokenizer, check_same_vocabulary, plan_connections
from .serialization import (
    AUGMENT_TOKENIZER_DIR,
    WEIGHTS_NAME,
    load_composition,
    load_connection_weights,
    save_composition,
)
from .xtok import same_vocabulary, vocab_fingerprint

__all__ = ["Calm"]


@register
class Calm(Strategy):
    """CALM (arXiv 2401.02412): cross-attention connections from frozen augmenting models into a frozen anchor.

    >>> from compose import Composer
    >>> from compose.testing import tiny_model
    >>> c = Composer(tiny_model("llama", hidden=48, heads=6), tiny_model("gpt2", seed=1), strategy="calm", every=2)
    >>> c.strategy.plan
    [(0, 1, 1), (0, 3, 3)]
    >>> sorted({n.split(".")[2] for n in c.trainable_parameters()})  # norm=True: the norms train too
    ['k', 'kv_norm', 'o', 'proj', 'q', 'q_norm', 'v']
    """

    name = "calm"
    method = "CALM (composition to augment language models)"
    paper = "https://arxiv.org/abs/2401.02412"
    library_name = "compose"
    config_class = CalmOptions
    takes_augment = True
    needs_tokenizers = True
    build_reads_weights = True  # the config fingerprints the base models' weights
    adds = "projections + cross-attention to a frozen augmenting model"
    trains = "the projections and cross-attentions"
    saves = "composition weights + compose.json"

    def __init__(self, config: CalmOptions):
        super().__init__(config)
        #: ``[(augment_index, augment_layer, anchor_layer), ...]`` (set by ``build``/``load``).
        self.plan: list[tuple[int, int, int | str]] = []
        self._tokenizer: Any = None
        self._augment_tokenizers: list[Any] | None = None

    def set_tokenizers(self, tokenizer: Any, augment_tokenizers: list[Any] | None) -> None:
        """The anchor's tokenizer and one tokenizer (or ``None``) per augmenting model, for ``build``.

        An augmenting tokenizer whose vocabulary differs from the anchor's makes that model read
        the text with its own tokenizer (cross-tokenizer composition); ``None`` means the one
        saved beside the model, if any, else the anchor's vocabulary.
        """
        self._tokenizer = tokenizer
        self._augment_tokenizers = None if augment_tokenizers is None else list(augment_tokenizers)

    def check_data(self, model: nn.Module, data: Any, name: str) -> None:
        """Across tokenizers, the augmenting models read text: token ids alone cannot be composed."""
        if getattr(model, "is_cross_tokenizer", False):
            from .xtok import check_text_data

            check_text_data(data, name)

    @classmethod
    def is_pretrained_dir(cls, directory: Path) -> bool:
        """A ``CalmForCausalLM.save_pretrained`` directory (``model_type="compose_calm"``, no ``compose.json``)."""
        from ...io import read_json

        config = Path(directory) / "config.json"
        return config.is_file() and read_json(config).get("model_type") == CalmConfig.model_type

    @classmethod
    def load_pretrained(cls, directory: Path, anchor: Any, augments: list[Any] | None, dtype: Any) -> Pretrained:
        """``CalmForCausalLM.from_pretrained(directory)``; base models from ``anchor``/``augments`` or as recorded."""
        options = {"dtype": dtype} if dtype is not None else {}
        model = CalmForCausalLM.from_pretrained(directory, anchor=anchor, augments=augments, **options)
        strategy = cls(CalmOptions(**model.config.options))
        strategy.plan = list(model.plan)
        return Pretrained(strategy, model, model.config.anchor, list(model.config.augments))

    def build(self, anchor: PreTrainedModel, augments: list[PreTrainedModel]) -> nn.Module:
        if anchor is None:
            raise ValueError("calm needs an anchor model")
        anchor_tok, aug_toks, records = self._tokenizers_for(anchor, augments)
        self.plan = plan_connections(arch.num_layers(anchor), [arch.num_layers(a) for a in augments], self.config)
        config = CalmConfig.from_models(anchor, augments, self.plan, self.config.to_dict(), records)
        if not any(records):
            return CalmForCausalLM(config, anchor, augments)
        return CalmForCausalLM(config, anchor, augments, tokenizer=anchor_tok, augment_tokenizers=aug_toks)

    def _tokenizers_for(self, anchor: PreTrainedModel, augments: list[PreTrainedModel]):
        """Which augmenting models read text with their own tokenizer; the others must share the anchor's vocabulary."""
        if not augments:
            raise ValueError("calm needs at least one augmenting model: Composer(anchor, augment, strategy='calm')")
        for model in [anchor, *augments]:
            arch.get_family(model)  # unknown family: a clear error
        given = self._augment_tokenizers
        if given is not None and len(given) != len(augments):
            raise ValueError(
                f"augment_tokenizer has {len(given)} entries for {len(augments)} augmenting model(s); pass one "
                "per augmenting model (None for one that shares the anchor's tokenizer)"
            )
        anchor_tok = self._tokenizer if self._tokenizer is not None else _local_tokenizer(anchor)
        aug_toks: list[Any] = [None] * len(augments)
        records: list[dict[str, Any] | None] = [None] * len(augments)
        for i, aug in enumerate(augments):
            tok = given[i] if given is not None and given[i] is not None else _local_tokenizer(aug)
            if tok is None and anchor_tok is not None and aug.config.vocab_size == anchor.config.vocab_size:
                warnings.warn(
                    f"compose: augmenting model {i} has no tokenizer beside it and none was given, so it is assumed "
                    f"to read the anchor's token ids (both have {aug.config.vocab_size} tokens). If it was trained "
                    "with another tokenizer, pass it as augment_tokenizer=",
                    stacklevel=5,
                )
            if tok is None or (
                anchor_tok is not None
                and same_vocabulary(anchor_tok, tok)
                and aug.config.vocab_size == anchor.config.vocab_size
            ):
                check_same_vocabulary(anchor, [aug], [anchor_tok, tok] if anchor_tok is not None else [None], i)
                continue
            if anchor_tok is None:
                raise ValueError(
                    f"augmenting model {i} has its own tokenizer, so the anchor's ids are decoded back to text: "
                    "pass the anchor's tokenizer too (Composer(..., tokenizer=anchor_tokenizer))"
                )
            largest = max(tok.get_vocab().values(), default=-1)
            if largest >= aug.config.vocab_size:
                raise ValueError(
                    f"augment_tokenizer {i} has token id {largest}, beyond augmenting model {i}'s "
                    f"{aug.config.vocab_size} embeddings: it is not that model's tokenizer"
                )
            aug_toks[i] = tok
            records[i] = {
                "name": getattr(tok, "name_or_path", None) or None,
                "vocab": vocab_fingerprint(tok),
                "anchor_vocab": vocab_fingerprint(anchor_tok),
                "path": f"{AUGMENT_TOKENIZER_DIR}_{i}",
            }
        if any(records) and self.config.window is not None:
            raise ValueError(
                f"window={self.config.window} counts augmenting positions aligned one to one with the anchor's, "
                "which an augmenting model with its own tokenizer does not have; leave window unset (every "
                "augmenting token whose text the anchor token has seen is visible)"
            )
        return anchor_tok, aug_toks, records

    @staticmethod
    def _check_models(anchor: PreTrainedModel, augments: list[PreTrainedModel]) -> None:
        if not augments:
            raise ValueError("calm needs at least one augmenting model: Composer(anchor, augment, strategy='calm')")
        for model in [anchor, *augments]:
            arch.get_family(model)  # unknown family: a clear error
        check_same_vocabulary(anchor, augments)

    def save(self, model: nn.Module, directory: Path, *, max_shard_size: int | str | None = None) -> dict[str, Any]:
        # the connections only (the base models are referenced by name): one file
        if not isinstance(model, CalmForCausalLM):
            raise TypeError(f"calm saves a CalmForCausalLM, got {type(model).__name__}")
        save_composition(model, directory)
        return {"plan": [list(p) for p in model.plan], "layout": "save_pretrained"}

    def load(self, directory, state, anchor, augments) -> nn.Module:
        directory = Path(directory)
        if anchor is None:
            raise ValueError("calm.load needs the anchor model")
        if (directory / "config.json").is_file():
            model = load_composition(CalmForCausalLM, directory, anchor=anchor, augments=augments)
        else:
            model = self._load_legacy(directory, state, anchor, augments)
        self.plan = list(model.plan)
        return model

    def _load_legacy(self, directory: Path, state: dict[str, Any], anchor, augments) -> CalmForCausalLM:
        """A directory from before ``save_pretrained`` (``compose.json`` + ``calm.safetensors``, no config.json)."""
        self._check_models(anchor, augments)
        saved_sizes = state.get("augment_hidden_sizes")
        if saved_sizes is not None and len(augments) != len(saved_sizes):
            raise ValueError(
                f"{directory} was saved with {len(saved_sizes)} augmenting model(s); {len(augments)} given"
            )
        expected = {"anchor hidden size": (state.get("anchor_hidden_size"), arch.hidden_size(anchor))}
        for i, aug in enumerate(augments):
            if saved_sizes is not None:
                expected[f"augmenting model {i} hidden size"] = (saved_sizes[i], arch.hidden_size(aug))
        for what, (saved, given) in expected.items():
            if saved is not None and saved != given:
                raise ValueError(
                    f"{directory} does not fit the given models: saved {what} {saved}, given model has {given}"
                )
        if "plan" in state:
            plan = [(int(a), int(la), INPUT if lb == INPUT else int(lb)) for a, la, lb in state["plan"]]
        else:
            plan = plan_connections(arch.num_layers(anchor), [arch.num_layers(a) for a in augments], self.config)
        config = CalmConfig.from_models(anchor, augments, plan, self.config.to_dict())
        model = CalmForCausalLM(config, anchor, augments)
        load_connection_weights(model, directory / WEIGHTS_NAME, check_metadata=False)
        return model
