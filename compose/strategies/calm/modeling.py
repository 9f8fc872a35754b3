"""``CalmForCausalLM``: a frozen anchor and frozen augmenting models joined by trainable cross-attention.

A ``PreTrainedModel`` + ``GenerationMixin``: transformers' own ``generate`` decodes it over a
:class:`~compose.strategies.calm.cache.CalmCache`; ``save_pretrained`` writes the config and
the composition weights only; ``from_pretrained`` (and ``AutoModelForCausalLM.from_pretrained``
once ``compose`` is imported) loads the named base models and the composition.

How it runs (``docs/calm.md`` says why):

* Each augmenting model runs without grad through its base model only (no LM head), and only
  up to the highest layer a connection reads: a forward hook on that layer captures its output
  and raises :class:`~compose.strategies.calm.layers.StopForward`, which ``forward`` catches.
* The anchor is the unmodified transformers model; forward hooks on the connected blocks add
  the cross-attention output (a block may return a tensor or a tuple). The ``"input"`` target
  is a forward *pre*-hook on block 0 that rewrites its ``hidden_states``. Called on its own,
  outside ``forward``, the anchor is the plain anchor.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ... import arch, packing
from .cache import CalmCache
from .configuration import CalmConfig
from .cross import CrossTokenizerMixin
from .layers import CrossConnection, StopForward, Visibility, anchor_input_rms, windowed_visibility
from .options import INPUT, CalmOptions, anchor_target
from .training import FrozenBasesMixin
from .xtok import CrossTokenizer

__all__ = ["CalmForCausalLM"]

#: The output field holding the cache: ``cache`` in current transformers, ``past_key_values`` before.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


@functools.cache
def _cache_argument(cls: type) -> str:
    """The keyword ``cls.forward`` takes its cache by: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


@dataclass
class _Context:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    visible: list[torch.Tensor]  # one per augmenting model


class CalmForCausalLM(CrossTokenizerMixin, FrozenBasesMixin, PreTrainedModel, GenerationMixin):
    """CALM (arXiv 2401.02412): a frozen anchor composed with frozen augmenting models.

    Only ``connections`` (one :class:`CrossConnection` per planned connection) trains. Position
    ids follow ``attention_mask``, so a left-padded row computes the same as the unpadded one.

    Args:
        config: a :class:`CalmConfig` (plan and options).
        anchor: the anchor model; loaded from ``config.anchor`` when omitted.
        augments: the augmenting models; loaded from ``config.augments`` when omitted.
        tokenizer: the anchor's tokenizer; needed when an augmenting model has its own
            (``config.cross_tokenizers``), since the anchor ids are decoded back to text.
        augment_tokenizers: one tokenizer (or ``None``: the anchor's vocabulary) per augmenting model.

    >>> from compose import Composer
    >>> from compose.testing import tiny_model
    >>> c = Composer(tiny_model("llama", hidden=48, heads=6), tiny_model("gpt2", seed=1), strategy="calm", every=2)
    >>> type(c.model).__name__, c.model.config.model_type
    ('CalmForCausalLM', 'compose_calm')
    >>> c.model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, num_beams=2, do_sample=False).shape
    torch.Size([1, 6])
    """

    config_class = CalmConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(
        self,
        config: CalmConfig,
        anchor: PreTrainedModel | None = None,
        augments: list[PreTrainedModel] | None = None,
        *,
        tokenizer: Any = None,
        augment_tokenizers: list[Any] | None = None,
    ):
        super().__init__(config)
        if anchor is None or augments is None:
            from .serialization import load_bases

            anchor, augments = load_bases(config, anchor, augments)
        self.anchor = anchor
        self.augments = nn.ModuleList(augments)
        self.plan: list[tuple[int, int, int | str]] = [
            (int(a), int(la), anchor_target(lb)) for a, la, lb in config.plan
        ]
        self._check_plan()
        self.options = CalmOptions(**config.options)
        self.visibility: list[Visibility] = [windowed_visibility(self.options.window) for _ in augments]
        self.tokenizer = tokenizer
        self.augment_tokenizers: list[Any] = [None] * len(augments)
        self.cross: list[CrossTokenizer | None] = [None] * len(augments)
        self._set_tokenizers(tokenizer, augment_tokenizers)
        self.connections = self._build_connections()
        for model in [anchor, *augments]:
            model.requires_grad_(False)
            model.eval()
        self._ctx: _Context | None = None
        self._captured: list[dict[int, torch.Tensor]] | None = None
        self._gradient_checkpointing = False
        self._register_hooks()
        self.generation_config = copy.deepcopy(anchor.generation_config)
        self.post_init()

    def _check_plan(self) -> None:
        n_anchor, n_augs = arch.num_layers(self.anchor), [arch.num_layers(a) for a in self.augments]
        for a, la, lb in self.plan:
            if not (0 <= a < len(n_augs) and 0 <= la < n_augs[a] and (lb == INPUT or 0 <= lb < n_anchor)):
                raise ValueError(
                    f"connection {[a, la, lb]} of the config's plan does not fit the models: the anchor has "
                    f"{n_anchor} layers, the augmenting models have {n_augs}"
                )

    def _build_connections(self) -> nn.ModuleList:
        d_anchor = arch.hidden_size(self.anchor)
        heads = self.options.num_heads or arch.num_attention_heads(self.anchor)
        input_scale = None
        if self.options.out_scale is None and any(b == INPUT for _, _, b in self.plan):
            input_scale = anchor_input_rms(self.anchor)
        param = next(self.anchor.parameters())
        return nn.ModuleList(
            [
                CrossConnection(
                    arch.hidden_size(self.augments[a]),
                    d_anchor,
                    heads,
                    norm=self.options.norm,
                    gate=self.options.gate,
                    null_kv=self.options.null_kv,
                    scale=self.options.out_scale or (input_scale if b == INPUT else 1.0),
                )
                for a, _, b in self.plan
            ]
        ).to(device=param.device, dtype=param.dtype)

    def _register_hooks(self) -> None:
        anchor_blocks = arch.get_blocks(self.anchor)
        for layer in sorted({b for _, _, b in self.plan if b != INPUT}):
            anchor_blocks[layer].register_forward_hook(functools.partial(self._anchor_hook, layer))
        if any(b == INPUT for _, _, b in self.plan):
            anchor_blocks[0].register_forward_pre_hook(self._anchor_input_hook, with_kwargs=True)
        for index, aug in enumerate(self.augments):
            used = sorted({a for i, a, _ in self.plan if i == index})
            blocks = arch.get_blocks(aug)
            for layer in used:
                blocks[layer].register_forward_hook(
                    functools.partial(self._augment_hook, index, layer, layer == used[-1])
                )

    # ------------------------------------------------------------------ PreTrainedModel glue
    def init_weights(self) -> None:
        """Nothing to initialise: the connections are initialised when built, the bases are frozen as given."""

    def _init_weights(self, module: nn.Module) -> None:
        pass

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        """Each base model ties its own weights; the connections tie nothing."""
        for model in [self.anchor, *self.augments]:
            model.tie_weights()

    def get_input_embeddings(self) -> nn.Module:
        return self.anchor.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.anchor.get_output_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        raise NotImplementedError("the anchor of a CALM composition is frozen; its embeddings cannot be replaced")

    # ------------------------------------------------------------------ hooks
    def _augment_hook(self, index: int, layer: int, last: bool, module, args, output):
        if self._captured is None:  # the augmenting model called on its own
            return None
        self._captured[index][layer] = output[0] if isinstance(output, tuple) else output
        if last:
            raise StopForward

    def _delta(self, layer: int | str, hidden: torch.Tensor, ctx: _Context) -> torch.Tensor:
        """Sum of the outputs of the connections into ``layer`` (an index or ``"input"``)."""
        delta = None
        for c, (a, _, b) in enumerate(self.plan):
            if b == layer:
                d = self.connections[c](hidden, ctx.keys[c], ctx.values[c], ctx.visible[a])
                delta = d if delta is None else delta + d
        return delta

    def _anchor_hook(self, layer: int, module, args, output):
        ctx = self._ctx
        if ctx is None:  # the anchor called on its own: the plain anchor
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + self._delta(layer, hidden, ctx)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _anchor_input_hook(self, module, args, kwargs):
        """Pre-hook on anchor block 0: add the ``"input"`` connections to its ``hidden_states``."""
        ctx = self._ctx
        if ctx is None:
            return None
        if args:
            hidden = args[0]
            return (hidden + self._delta(INPUT, hidden, ctx), *args[1:]), kwargs
        if "hidden_states" not in kwargs:
            raise RuntimeError(
                f"{type(module).__name__} was called without hidden_states; the CALM 'input' connection "
                "cannot find the anchor's embedding output"
            )
        hidden = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": hidden + self._delta(INPUT, hidden, ctx)}

    # ------------------------------------------------------------------ forward
    def _augment_states(self, i, input_ids, attention_mask, position_ids, cache, docs=None) -> dict[int, torch.Tensor]:
        base = self.augments[i].base_model
        self._captured = [{} for _ in self.augments]
        try:
            with torch.no_grad():
                base(
                    input_ids=input_ids,
                    use_cache=cache is not None,
                    **{_cache_argument(type(base)): cache},
                    **packing.base_inputs(base, attention_mask, position_ids, docs),
                )
        except StopForward:
            pass
        finally:
            captured, self._captured = self._captured[i], None
        return captured

    def _context(self, input_ids, attention_mask, position_ids, cache, past: int, docs=None) -> _Context:
        """Run the augmenting models, project their states, and say which key each query sees (in its document)."""
        keys: list[torch.Tensor | None] = [None] * len(self.plan)
        values: list[torch.Tensor | None] = [None] * len(self.plan)
        visible: list[torch.Tensor | None] = [None] * len(self.augments)
        device = input_ids.device
        for i in range(len(self.augments)):
            conns = [c for c, (a, _, _) in enumerate(self.plan) if a == i]
            if self.cross[i] is not None:
                if docs is not None:
                    visible[i] = self._cross_documents(i, conns, input_ids, docs, keys, values)
                elif cache is None:
                    visible[i] = self._cross_full(i, conns, input_ids, attention_mask, keys, values)
                else:
                    visible[i] = self._cross_cached(i, conns, input_ids, attention_mask, cache, keys, values)
                continue
            states = self._augment_states(
                i, input_ids, attention_mask, position_ids, cache.augments[i] if cache else None, docs
            )
            for c in conns:
                k, v = self.connections[c].keys_values(states[self.plan[c][1]])
                if cache is not None:
                    k, v = cache.append(c, k, v)
                keys[c], values[c] = k, v
            query_index = torch.arange(past, past + input_ids.shape[1], device=device)
            key_index = torch.arange(past + input_ids.shape[1], device=device)
            visible[i] = packing.within_documents(self.visibility[i](query_index, key_index, attention_mask), docs)
        return _Context(keys, values, visible)

    @staticmethod
    def _check_extra(kwargs: dict[str, Any], inputs_embeds: torch.Tensor | None) -> None:
        """Refuse what the composition cannot honour; other keywords (``generate`` passes a few) are ignored."""
        if inputs_embeds is not None:
            raise ValueError(
                "CALM needs input_ids (the augmenting models read the same tokens); inputs_embeds is not supported"
            )
        wanted = sorted(k for k in ("output_attentions", "output_hidden_states") if kwargs.get(k))
        if wanted:
            raise ValueError(f"CalmForCausalLM does not return attentions or hidden states ({', '.join(wanted)})")

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: CalmCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: CalmCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits of the composition; ``.loss`` is the shifted next-token cross-entropy (``ignore_index=-100``).

        ``cache`` (or its older name ``past_key_values``) is a :class:`CalmCache` from a previous
        call; ``use_cache=True`` starts one. ``attention_mask`` covers past and new tokens.
        """
        self._check_extra(kwargs, inputs_embeds)
        if input_ids is None:
            raise ValueError("CalmForCausalLM.forward needs input_ids")
        cache = CalmCache.resolve(
            cache if cache is not None else past_key_values, use_cache, self.anchor, list(self.augments), len(self.plan)
        )
        batch, q_len = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        docs = packing.packed_documents(attention_mask, cache, position_ids)
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + q_len, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (batch, past + q_len):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(batch, past + q_len)} "
                f"(past tokens {past} + new tokens {q_len})"
            )
        attention_mask = attention_mask.long()
        if position_ids is None:
            position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)[:, -q_len:]
        self._ctx = self._context(input_ids, attention_mask, position_ids, cache, past, docs)
        try:
            out = self.anchor(
                input_ids=input_ids,
                use_cache=cache is not None,
                logits_to_keep=logits_to_keep,
                **{_cache_argument(type(self.anchor)): cache.anchor if cache is not None else None},
                **packing.base_inputs(self.anchor, attention_mask, position_ids, docs),
            )
        finally:
            self._ctx = None
        if cache is not None:
            cache.length = past + q_len
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()
            target = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, **{_CACHE_FIELD: cache})

    # ------------------------------------------------------------------ generation
    def _prepare_cache_for_generation(self, generation_config: GenerationConfig, model_kwargs: dict, *args, **kwargs):
        """Give ``generate`` a :class:`CalmCache` (the default ``DynamicCache`` cannot hold a composition)."""
        given = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if given is not None:
            if not isinstance(given, CalmCache):
                raise TypeError(f"a CALM composition generates with a CalmCache, got {type(given).__name__}")
            return
        if generation_config.use_cache is False:
            return
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported by a CALM "
                "composition; leave it unset (each model keeps a dynamic cache)"
            )
        model_kwargs[_CACHE_FIELD] = CalmCache.for_models(self.anchor, list(self.augments), len(self.plan))

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write ``config.json``, ``generation_config.json`` and the composition weights (safetensors) only.

        The base models are not written: the config names them (and fingerprints them), and
        :meth:`from_pretrained` loads them from there.
        """
        from .serialization import save_composition

        save_composition(self, save_directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *args: Any,
        anchor: PreTrainedModel | str | None = None,
        augments: list[PreTrainedModel | str] | None = None,
        **kwargs: Any,
    ) -> CalmForCausalLM:
        """Load the base models named in the config (or ``anchor=`` / ``augments=``), then the composition.

        ``dtype`` / ``device_map`` and other loading options go to the base models. Model objects
        passed as ``anchor`` / ``augments`` are used as they are (frozen and hooked), not copied. A base model
        whose fingerprint differs from the one saved, or a directory from a newer compose, is
        a ``ValueError``; a base model that cannot be found is an ``OSError`` naming it.
        """
        from .serialization import load_composition

        if args:
            raise TypeError("CalmForCausalLM.from_pretrained takes no positional model arguments")
        return load_composition(cls, pretrained_model_name_or_path, anchor=anchor, augments=augments, **kwargs)
