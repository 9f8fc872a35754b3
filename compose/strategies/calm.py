"""CALM: composition of a frozen anchor with frozen augmenting models (Bansal et al., arXiv 2401.02412).

Both the anchor ``m_B`` and every augmenting model ``m_A`` stay frozen. For each
connection ``(augment_layer i, anchor_layer j)`` a small trainable module

* projects ``m_A``'s layer-``i`` output from ``D_A`` to ``D_B`` (``proj``),
* cross-attends from ``m_B``'s layer-``j`` output (queries) to the projected states
  (keys / values), with ``m_B``'s head count by default,
* and adds the result to ``m_B``'s residual stream right after layer ``j``, or, for the
  anchor layer ``"input"``, to the input of ``m_B``'s first block (the token embeddings as
  block 0 receives them), so that the injected vector lives in ``m_B``'s embedding space.

The cross-attention's output projection starts at zero, so the composed model equals the
anchor exactly until it is trained. Cross-attention is causal and position-aligned:
anchor position ``t`` sees augmenting positions ``<= t`` only, never a padded one
(:func:`causal_visibility`; a cross-tokenizer alignment would replace that function).

How it runs (see ``docs/calm.md`` for the why):

* Each augmenting model runs under ``no_grad`` through its base model only (no LM head),
  and only up to the highest layer a connection reads: a forward hook on that layer
  captures its output and raises :class:`StopForward`, which :meth:`CalmModel.forward`
  catches. Layers above are never computed, and their KV cache is never written.
* The anchor is the unmodified transformers model; forward hooks on the connected
  blocks add the cross-attention output. A hook handles blocks returning a tensor
  (transformers 5) or a tuple (older). The ``"input"`` target is a forward *pre*-hook on
  block 0 that rewrites its ``hidden_states`` argument (positional or keyword). Called on its own (outside
  :meth:`CalmModel.forward`) the anchor is the plain anchor.
* Generation is our own decoding loop (:meth:`CalmModel.generate`, transformers
  semantics for greedy / sampling / eos / padding): the anchor and each augmenting model
  keep their own KV cache and each connection caches its projected keys and values
  (:class:`CalmCache`), so a new token costs one incremental step of every model.

>>> from compose import Composer
>>> from compose.testing import tiny_model
>>> c = Composer(tiny_model("llama", hidden=48, heads=6), tiny_model("gpt2", seed=1), strategy="calm", every=2)
>>> c.strategy.plan
[(0, 1, 1), (0, 3, 3)]
>>> sorted({n.split(".")[2] for n in c.trainable_parameters()})
['k', 'o', 'proj', 'q', 'v']
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache, GenerationConfig, PreTrainedModel
from transformers.generation import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import arch
from .base import Strategy, StrategyConfig, register

__all__ = [
    "CalmConfig",
    "Calm",
    "CalmModel",
    "CalmCache",
    "CrossConnection",
    "StopForward",
    "anchor_input_rms",
    "causal_visibility",
    "windowed_visibility",
    "plan_connections",
    "check_same_vocabulary",
    "WEIGHTS_NAME",
    "INPUT",
]

WEIGHTS_NAME = "calm.safetensors"

#: The anchor "layer" of a connection that feeds the input of the anchor's first block (its
#: embedding output) instead of the output of a block. ``"embed"`` is accepted as a synonym.
INPUT = "input"
_INPUT_NAMES = ("input", "embed")

#: A visibility function: ``(query_index [q], key_index [kv], key_mask [B, kv]) -> [B, q, kv]`` bool,
#: True where an anchor query may attend to an augmenting key. Indices are token positions
#: in the (padded) input sequence.
Visibility = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal_visibility(query_index: torch.Tensor, key_index: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Same tokenizer: anchor token ``t`` sees augmenting tokens ``s <= t`` that are not padding.

    A cross-tokenizer alignment plugs in here with the same signature, mapping each
    anchor token to the augmenting tokens whose character span ends at or before its own.
    """
    causal = key_index[None, None, :] <= query_index[None, :, None]
    return causal & key_mask.bool()[:, None, :]


def windowed_visibility(window: int | None) -> Visibility:
    """:func:`causal_visibility` limited to the last ``window`` positions (``t - window < s <= t``).

    ``None`` is :func:`causal_visibility` itself. Positions are indices in the padded
    sequence; left padding shifts queries and keys alike, so the window is unchanged.
    """
    if window is None:
        return causal_visibility

    def visibility(query_index: torch.Tensor, key_index: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        near = key_index[None, None, :] > query_index[None, :, None] - window
        return causal_visibility(query_index, key_index, key_mask) & near

    return visibility


class StopForward(Exception):
    """Raised by a hook on an augmenting model's highest used layer to skip the layers above it."""


@torch.no_grad()
def anchor_input_rms(anchor: PreTrainedModel, max_tokens: int = 4096) -> float:
    """RMS of what the anchor's first block receives, over (a spread sample of) its vocabulary.

    Measured, not read off the embedding matrix, so that a family's embedding multiplier
    (Gemma's ``sqrt(hidden)``) or added position embeddings (GPT-2) are included. Every
    token is a one-token sequence at position 0; the blocks themselves never run.
    """
    vocab = anchor.get_input_embeddings().weight.shape[0]
    device = next(anchor.parameters()).device
    ids = torch.linspace(0, vocab - 1, min(vocab, max_tokens), device=device).long().unique()[:, None]
    seen: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])
        raise StopForward

    handle = arch.get_blocks(anchor)[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        anchor.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{type(anchor).__name__}'s first block never ran; cannot measure its input scale")
    return float(seen[0].float().pow(2).mean().sqrt())


@dataclass
class CalmConfig(StrategyConfig):
    """Options of ``calm``.

    Attributes:
        every: connect every ``every``-th augmenting layer (``every-1, 2*every-1, ...``) to
            evenly spaced anchor layers; the paper uses 4. Ignored where ``connections`` is given.
        connections: explicit ``[(augment_layer, anchor_layer), ...]`` for one augmenting
            model, or a list of such lists, one per augmenting model. Negative indices count
            from the end. ``anchor_layer`` may be ``"input"`` (or ``"embed"``): the connection
            then adds to the input of the anchor's first block (the embedding output), with
            the embeddings as queries, instead of to a block's output.
        num_heads: cross-attention heads; default the anchor's attention heads (as in the paper).
        norm: LayerNorm on the cross-attention queries and on the projected augmenting states
            (a stabiliser some re-implementations use; off in the paper).
        gate: a tanh gate per connection, initialised at 0 (Flamingo style); the output
            projection is then randomly initialised instead of zeroed. Off by default.
        window: anchor token ``t`` sees augmenting tokens ``t - window < s <= t`` only
            (default ``None``: every ``s <= t``, as in the paper). ``1`` reads the aligned
            token alone, which makes each connection a per-token map of the augmenting state.
        null_kv: a learned "null" key/value slot every query can attend to, so that a query
            can take nothing from the augmenting model (off in the paper). With ``window=1``
            it turns the connection into a content gate: read the aligned token, or nothing.
        out_scale: a fixed factor on every connection's output. ``None`` (default): 1 for a
            connection into a block's output; for one into the anchor's ``"input"``, the RMS
            of what block 0 receives (the anchor's embedding output, measured once when the
            model is built), so that the output starts at the scale of the stream it is added
            to. Without it, Adam's first steps at usual learning rates write vectors several
            times larger than the token embeddings they are added to (docs/results.md).
    """

    every: int = 4
    connections: list | None = None
    num_heads: int | None = None
    norm: bool = False
    gate: bool = False
    window: int | None = None
    null_kv: bool = False
    out_scale: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be a positive integer, got {self.every!r}")
        if self.num_heads is not None and (
            isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int) or self.num_heads < 1
        ):
            raise ValueError(f"num_heads must be a positive integer or None, got {self.num_heads!r}")
        if self.window is not None and (not _is_int(self.window) or self.window < 1):
            raise ValueError(f"window must be a positive integer or None, got {self.window!r}")
        if self.out_scale is not None and (
            isinstance(self.out_scale, bool) or not isinstance(self.out_scale, (int, float)) or self.out_scale <= 0
        ):
            raise ValueError(f"out_scale must be a positive number or None, got {self.out_scale!r}")
        if self.connections is not None:
            self.connections = _normalise_connections(self.connections)

    def to_dict(self) -> dict[str, Any]:
        return {
            "every": self.every,
            "connections": self.connections,
            "num_heads": self.num_heads,
            "norm": self.norm,
            "gate": self.gate,
            "window": self.window,
            "null_kv": self.null_kv,
            "out_scale": self.out_scale,
        }


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_pair(x: Any) -> bool:
    return (
        isinstance(x, (list, tuple))
        and len(x) == 2
        and _is_int(x[0])
        and (_is_int(x[1]) or (isinstance(x[1], str) and x[1].lower() in _INPUT_NAMES))
    )


def _anchor_target(b: Any) -> int | str:
    """An anchor layer index, or :data:`INPUT` for ``"input"`` / ``"embed"``."""
    return INPUT if isinstance(b, str) else int(b)


def _normalise_connections(connections: Any) -> list[list[list[int]]]:
    """One list of ``[augment_layer, anchor_layer]`` pairs per augmenting model."""
    bad = ValueError(
        "connections must be [(augment_layer, anchor_layer), ...] (anchor_layer an index or "
        '"input" for the input of the first anchor block) or, for several augmenting models, '
        f"a list of such lists; got {connections!r}"
    )
    if not isinstance(connections, (list, tuple)) or not connections:
        raise bad
    if all(_is_pair(c) for c in connections):
        groups = [connections]
    elif all(isinstance(g, (list, tuple)) and g and all(_is_pair(c) for c in g) for g in connections):
        groups = list(connections)
    else:
        raise bad
    return [[[int(a), _anchor_target(b)] for a, b in group] for group in groups]


def plan_connections(
    anchor_layers: int, augment_layers: list[int], config: CalmConfig
) -> list[tuple[int, int, int | str]]:
    """``[(augment_index, augment_layer, anchor_layer), ...]`` with non-negative layer indices.

    ``anchor_layer`` is :data:`INPUT` (``"input"``) for a connection into the input of the
    anchor's first block.

    Default (the paper's): augmenting layers ``every-1, 2*every-1, ...``; the ``n`` anchor
    layers are spread evenly, connection ``k`` going after anchor layer
    ``ceil((k+1) * L_B / n) - 1`` so that the last one reads the last augmenting layer
    used into the anchor's last layer.
    """
    plan: list[tuple[int, int, int | str]] = []
    if config.connections is not None:
        if len(config.connections) != len(augment_layers):
            raise ValueError(
                f"connections are given for {len(config.connections)} augmenting model(s) but "
                f"{len(augment_layers)} were passed; give one list of (augment_layer, anchor_layer) per model"
            )
        for index, (group, n_aug) in enumerate(zip(config.connections, augment_layers)):
            for a, b in group:
                if not -n_aug <= a < n_aug:
                    raise ValueError(
                        f"augmenting layer {a} of connection {(a, b)} is out of range: augmenting model {index} "
                        f"has {n_aug} layers (valid: 0..{n_aug - 1})"
                    )
                if b == INPUT:
                    plan.append((index, a % n_aug, INPUT))
                    continue
                if not -anchor_layers <= b < anchor_layers:
                    raise ValueError(
                        f"anchor layer {b} of connection {(a, b)} is out of range: the anchor has "
                        f"{anchor_layers} layers (valid: 0..{anchor_layers - 1})"
                    )
                plan.append((index, a % n_aug, b % anchor_layers))
        return plan
    for index, n_aug in enumerate(augment_layers):
        n = n_aug // config.every
        if n == 0:
            raise ValueError(
                f"augmenting model {index} has {n_aug} layers, so every={config.every} selects none; "
                "lower `every` or pass connections=[(augment_layer, anchor_layer), ...]"
            )
        for k in range(n):
            plan.append((index, (k + 1) * config.every - 1, -(-(k + 1) * anchor_layers // n) - 1))
    return plan


def check_same_vocabulary(anchor: PreTrainedModel, augments: list[PreTrainedModel], tokenizers: list | None = None):
    """``ValueError`` unless the anchor and every augmenting model share a vocabulary.

    Compares ``config.vocab_size`` always, and the tokenizers' vocabularies when they are
    known: passed in ``tokenizers`` (anchor first), or saved in the local directory a
    model was loaded from. CALM aligns positions token by token, so a different tokenizer
    would silently pair unrelated tokens.
    """
    v_anchor = anchor.config.vocab_size
    for index, aug in enumerate(augments):
        if aug.config.vocab_size != v_anchor:
            raise ValueError(
                f"vocabulary mismatch: the anchor has {v_anchor} tokens, augmenting model {index} has "
                f"{aug.config.vocab_size}. CALM needs anchor and augmenting models to share a tokenizer "
                "(cross-tokenizer alignment is not supported yet)"
            )
    if tokenizers is None:
        tokenizers = [_local_tokenizer(m) for m in [anchor, *augments]]
    if tokenizers and tokenizers[0] is not None:
        reference = tokenizers[0].get_vocab()
        for index, tok in enumerate(tokenizers[1:]):
            if tok is not None and tok.get_vocab() != reference:
                raise ValueError(
                    f"tokenizer mismatch: augmenting model {index}'s tokenizer has a different vocabulary than the "
                    "anchor's. CALM needs anchor and augmenting models to share a tokenizer"
                )


def _local_tokenizer(model: PreTrainedModel):
    """The tokenizer saved beside a model loaded from a local directory, if any (never the network)."""
    path = getattr(model.config, "_name_or_path", "") or ""
    if not path or not Path(path).is_dir():
        return None
    if not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - an unreadable tokenizer is "unknown", the vocab_size check still holds
        return None


class CrossConnection(nn.Module):
    """Projection ``D_A -> D_B`` plus multi-head cross-attention into the anchor stream.

    ``o`` (the output projection) is zero-initialised, so the connection adds exactly 0
    until trained. With ``gate=True``, ``o`` is random and a tanh gate at 0 plays that role.
    With ``null_kv=True`` every query also sees a learned key/value pair (``null_k``,
    ``null_v``, one per head, initialised at 0) that stands for "nothing to read".
    ``scale`` (a buffer, saved with the weights) multiplies the output.
    """

    def __init__(
        self,
        d_augment: int,
        d_anchor: int,
        num_heads: int,
        *,
        norm: bool = False,
        gate: bool = False,
        null_kv: bool = False,
        scale: float = 1.0,
    ):
        super().__init__()
        if d_anchor % num_heads:
            raise ValueError(
                f"the anchor's hidden size {d_anchor} is not divisible by {num_heads} cross-attention heads; "
                "pass num_heads= that divides it"
            )
        self.num_heads = num_heads
        self.head_dim = d_anchor // num_heads
        self.proj = nn.Linear(d_augment, d_anchor)
        self.kv_norm = nn.LayerNorm(d_anchor) if norm else None
        self.q_norm = nn.LayerNorm(d_anchor) if norm else None
        self.q = nn.Linear(d_anchor, d_anchor, bias=False)
        self.k = nn.Linear(d_anchor, d_anchor, bias=False)
        self.v = nn.Linear(d_anchor, d_anchor, bias=False)
        self.o = nn.Linear(d_anchor, d_anchor, bias=False)
        self.register_buffer("scale", torch.tensor(float(scale)))
        if null_kv:
            self.null_k = nn.Parameter(torch.zeros(num_heads, 1, self.head_dim))
            self.null_v = nn.Parameter(torch.zeros(num_heads, 1, self.head_dim))
        else:
            self.null_k = self.null_v = None
        if gate:
            self.gate = nn.Parameter(torch.zeros(1))
        else:
            self.gate = None
            nn.init.zeros_(self.o.weight)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, augment_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project augmenting states ``[B, S, D_A]`` to keys and values ``[B, heads, S, head_dim]``."""
        x = self.proj(augment_hidden.to(self.proj.weight.dtype))
        if self.kv_norm is not None:
            x = self.kv_norm(x)
        return self._heads(self.k(x)), self._heads(self.v(x))

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor):
        """What to add to the anchor's ``hidden [B, q, D_B]``; ``visible [B, q, kv]`` says who sees what."""
        x = hidden.to(self.q.weight.dtype)
        if self.q_norm is not None:
            x = self.q_norm(x)
        q = self._heads(self.q(x))
        # A query that sees no key (a padded position, or a left-padded row before its first
        # token) would get NaN from softmax over nothing; let it see everything and zero its output.
        any_visible = visible.any(-1)
        mask = (visible | ~any_visible[..., None])[:, None]
        if self.null_k is not None:
            b = keys.shape[0]
            keys = torch.cat([self.null_k.to(keys.dtype).expand(b, -1, -1, -1), keys], dim=2)
            values = torch.cat([self.null_v.to(values.dtype).expand(b, -1, -1, -1), values], dim=2)
            mask = F.pad(mask, (1, 0), value=True)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out * any_visible[:, None, :, None].to(out.dtype)
        out = self.o(out.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1))
        if self.gate is not None:
            out = torch.tanh(self.gate) * out
        return (out * self.scale.to(out.dtype)).to(hidden.dtype)


class CalmCache:
    """Everything incremental decoding keeps: one KV cache per model, projected keys/values per connection.

    ``key_mask`` is the attention mask of all tokens seen so far; ``length`` their count.
    """

    def __init__(self, anchor: PreTrainedModel, augments: list[PreTrainedModel], num_connections: int):
        self.anchor = DynamicCache(config=anchor.config)
        self.augments = [DynamicCache(config=a.config) for a in augments]
        self.keys: list[torch.Tensor | None] = [None] * num_connections
        self.values: list[torch.Tensor | None] = [None] * num_connections
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length

    def append(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[index] is not None:
            keys = torch.cat([self.keys[index], keys], dim=2)
            values = torch.cat([self.values[index], values], dim=2)
        self.keys[index], self.values[index] = keys, values
        return keys, values


@dataclass
class _Context:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    visible: list[torch.Tensor]  # one per augmenting model


_GENERATE_OPTIONS = (
    "max_new_tokens",
    "max_length",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
)


class CalmModel(nn.Module):
    """A frozen anchor composed with frozen augmenting models through trainable :class:`CrossConnection` s.

    ``forward(input_ids, attention_mask=None, labels=None, past_key_values=None, use_cache=False)``
    returns a ``CausalLMOutputWithPast`` (``.loss`` is the shifted next-token cross-entropy,
    ``ignore_index=-100``). Only ``connections`` has ``requires_grad=True``. Position ids
    are derived from ``attention_mask`` (as transformers' ``generate`` does), so a
    left-padded row computes the same as the unpadded sequence.
    """

    def __init__(
        self,
        anchor: PreTrainedModel,
        augments: list[PreTrainedModel],
        plan: list[tuple[int, int, int | str]],
        config: CalmConfig,
    ):
        super().__init__()
        self.anchor = anchor
        self.augments = nn.ModuleList(augments)
        self.plan = [(int(a), int(la), _anchor_target(lb)) for a, la, lb in plan]
        self.calm_config = config
        self.visibility: list[Visibility] = [windowed_visibility(config.window) for _ in augments]
        d_anchor = arch.hidden_size(anchor)
        heads = config.num_heads or arch.num_attention_heads(anchor)
        param = next(anchor.parameters())
        input_scale = None
        if config.out_scale is None and any(b == INPUT for _, _, b in self.plan):
            input_scale = anchor_input_rms(anchor)
        self.connections = nn.ModuleList(
            [
                CrossConnection(
                    arch.hidden_size(augments[a]),
                    d_anchor,
                    heads,
                    norm=config.norm,
                    gate=config.gate,
                    null_kv=config.null_kv,
                    scale=config.out_scale or (input_scale if b == INPUT else 1.0),
                )
                for a, _, b in self.plan
            ]
        ).to(device=param.device, dtype=param.dtype)

        for model in [anchor, *augments]:
            model.requires_grad_(False)
            model.eval()
        self._ctx: _Context | None = None
        self._captured: list[dict[int, torch.Tensor]] | None = None
        self._gradient_checkpointing = False
        anchor_blocks = arch.get_blocks(anchor)
        for layer in sorted({b for _, _, b in self.plan if b != INPUT}):
            anchor_blocks[layer].register_forward_hook(functools.partial(self._anchor_hook, layer))
        if any(b == INPUT for _, _, b in self.plan):
            anchor_blocks[0].register_forward_pre_hook(self._anchor_input_hook, with_kwargs=True)
        for index, aug in enumerate(augments):
            used = sorted({a for i, a, _ in self.plan if i == index})
            blocks = arch.get_blocks(aug)
            for layer in used:
                blocks[layer].register_forward_hook(
                    functools.partial(self._augment_hook, index, layer, layer == used[-1])
                )

    # ------------------------------------------------------------------ conveniences
    @property
    def config(self):
        """The anchor's config (what trainers and loggers look for)."""
        return self.anchor.config

    @property
    def generation_config(self) -> GenerationConfig:
        return self.anchor.generation_config

    @property
    def device(self) -> torch.device:
        return next(self.anchor.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.anchor.parameters()).dtype

    def train(self, mode: bool = True) -> CalmModel:
        """Train mode for the connections only; the frozen models stay in eval mode (no dropout).

        With gradient checkpointing on, the anchor's decoder blocks themselves (not their
        sub-modules, so dropout stays off) get ``training=mode``, because transformers only
        checkpoints a block in training mode.
        """
        self.training = mode
        self.connections.train(mode)
        for model in [self.anchor, *self.augments]:
            model.eval()
        self.augments.training = False
        if self._gradient_checkpointing:
            for block in arch.get_blocks(self.anchor):
                block.training = mode
        return self

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Checkpoint the anchor's blocks (non-reentrant by default).

        The connection hooks sit outside the checkpointed ``forward`` (transformers >= 5
        checkpoints ``forward``, not ``__call__``), so the backward recomputation does not
        re-run them; the augmenting models run without grad and need no checkpointing.
        """
        block = arch.get_blocks(self.anchor)[0]
        if not hasattr(type(block).forward, "__wrapped__"):
            # Older transformers checkpoint ``__call__``: the connection hooks would re-run in the
            # recomputation without their context and silently give wrong gradients.
            raise RuntimeError(
                f"{type(block).__name__} does not checkpoint its forward (transformers too old?); "
                "CALM gradient checkpointing needs transformers >= 5"
            )
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if hasattr(self.anchor, "activation_checkpointing_enable"):  # transformers >= 5.x name
            self.anchor.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.anchor.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self._gradient_checkpointing = True
        self.train(self.training)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None) -> None:
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        if hasattr(self.anchor, "activation_checkpointing_disable"):
            self.anchor.activation_checkpointing_disable()
        else:
            self.anchor.gradient_checkpointing_disable()
        self._gradient_checkpointing = False
        self.train(self.training)

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._gradient_checkpointing

    # ------------------------------------------------------------------ hooks
    def _augment_hook(self, index: int, layer: int, last: bool, module, args, output):
        if self._captured is None:  # the augmenting model called on its own
            return None
        self._captured[index][layer] = output[0] if isinstance(output, tuple) else output
        if last:
            raise StopForward

    def _delta(self, layer: int | str, hidden: torch.Tensor, ctx: _Context) -> torch.Tensor:
        """Sum of the outputs of the connections into ``layer`` (an index or :data:`INPUT`)."""
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
        if ctx is None:  # the anchor called on its own: the plain anchor
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
    def _augment_states(self, index, input_ids, attention_mask, position_ids, cache) -> dict[int, torch.Tensor]:
        aug = self.augments[index]
        self._captured = [{} for _ in self.augments]
        try:
            with torch.no_grad():
                aug.base_model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=cache is not None,
                )
        except StopForward:
            pass
        finally:
            captured, self._captured = self._captured[index], None
        return captured

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: CalmCache | None = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if kwargs:
            raise TypeError(f"CalmModel.forward got unexpected arguments {sorted(kwargs)}")
        if past_key_values is not None and not isinstance(past_key_values, CalmCache):
            raise TypeError(f"past_key_values must be a CalmCache, got {type(past_key_values).__name__}")
        batch, q_len = input_ids.shape
        device = input_ids.device
        past = past_key_values.length if past_key_values is not None else 0
        total = past + q_len
        if attention_mask is None:
            attention_mask = torch.ones(batch, total, dtype=torch.long, device=device)
        if attention_mask.shape != (batch, total):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(batch, total)} "
                f"(past tokens {past} + new tokens {q_len})"
            )
        attention_mask = attention_mask.long()
        if position_ids is None:
            position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)[:, -q_len:]
        cache = past_key_values
        if use_cache and cache is None:
            cache = CalmCache(self.anchor, list(self.augments), len(self.plan))

        states = [
            self._augment_states(
                i, input_ids, attention_mask, position_ids, cache.augments[i] if cache is not None else None
            )
            for i in range(len(self.augments))
        ]
        keys, values = [], []
        for c, (a, layer, _) in enumerate(self.plan):
            k, v = self.connections[c].keys_values(states[a][layer])
            if cache is not None:
                k, v = cache.append(c, k, v)
            keys.append(k)
            values.append(v)
        query_index = torch.arange(past, total, device=device)
        key_index = torch.arange(total, device=device)
        visible = [fn(query_index, key_index, attention_mask) for fn in self.visibility]

        self._ctx = _Context(keys, values, visible)
        try:
            out = self.anchor(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache.anchor if cache is not None else None,
                use_cache=cache is not None,
                logits_to_keep=logits_to_keep,
            )
        finally:
            self._ctx = None
        if cache is not None:
            cache.length = total

        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()
            target = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, past_key_values=cache)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy or sampled decoding with transformers ``generate`` semantics; returns prompt + new tokens.

        Accepted options: ``max_new_tokens``, ``max_length``, ``do_sample``, ``temperature``,
        ``top_k``, ``top_p``, ``min_p``, ``eos_token_id`` (int or list), ``pad_token_id``,
        ``use_cache`` (``False`` re-runs the full forward every step; for checking and
        benchmarks). Defaults come from the anchor's ``generation_config``, as in
        transformers (so sampling uses its ``top_k``, 50 unless set). Finished rows are
        filled with ``pad_token_id``; decoding stops when every row has finished.
        """
        unknown = sorted(set(kwargs) - set(_GENERATE_OPTIONS))
        if unknown:
            raise ValueError(
                f"CalmModel.generate does not support {', '.join(map(repr, unknown))}; "
                f"accepted: {', '.join(_GENERATE_OPTIONS)}"
            )
        use_cache = kwargs.pop("use_cache", True)
        gen = copy.deepcopy(generation_config if generation_config is not None else self.anchor.generation_config)
        gen.update(**kwargs)
        if gen.num_beams not in (None, 1):
            raise ValueError("CalmModel.generate supports greedy search and sampling only (num_beams=1)")
        batch, prompt_len = input_ids.shape
        if gen.max_new_tokens is not None:
            max_new = gen.max_new_tokens
        else:
            max_new = (gen.max_length if gen.max_length is not None else 20) - prompt_len
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.long()

        eos = gen.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        eos_t = torch.tensor(eos, device=input_ids.device, dtype=input_ids.dtype)
        pad = gen.pad_token_id
        if pad is None and eos:
            pad = eos[0]
        if isinstance(pad, (list, tuple)):
            pad = pad[0]

        processors = LogitsProcessorList()
        if gen.do_sample:
            if gen.temperature is not None and gen.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(gen.temperature))
            if gen.top_k is not None and gen.top_k != 0:
                processors.append(TopKLogitsWarper(top_k=gen.top_k, min_tokens_to_keep=1))
            if gen.top_p is not None and gen.top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=gen.top_p, min_tokens_to_keep=1))
            if gen.min_p is not None:
                processors.append(MinPLogitsWarper(min_p=gen.min_p, min_tokens_to_keep=1))

        sequences = input_ids
        mask = attention_mask
        unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
        cache = None
        step_ids = input_ids
        for _ in range(max(max_new, 0)):
            if use_cache:
                out = self(step_ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
            else:
                out = self(sequences, attention_mask=mask, logits_to_keep=1)
            logits = out.logits[:, -1].to(dtype=torch.float32, copy=True)
            scores = processors(sequences, logits)
            if gen.do_sample:
                next_tokens = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                next_tokens = torch.argmax(scores, dim=-1)
            if eos:
                next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
            sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=-1)
            step_ids = next_tokens[:, None]
            if eos:
                unfinished = unfinished & ~torch.isin(next_tokens, eos_t)
                if unfinished.max() == 0:
                    break
        return sequences


@register
class Calm(Strategy):
    """CALM (arXiv 2401.02412): cross-attention connections from frozen augmenting models into a frozen anchor."""

    name = "calm"
    config_class = CalmConfig
    takes_augment = True

    def __init__(self, config: CalmConfig):
        super().__init__(config)
        #: ``[(augment_index, augment_layer, anchor_layer), ...]`` (set by ``build``/``load``).
        self.plan: list[tuple[int, int, int]] = []

    def build(self, anchor: PreTrainedModel, augments: list[PreTrainedModel]) -> nn.Module:
        if anchor is None:
            raise ValueError("calm needs an anchor model")
        self._check_models(anchor, augments)
        self.plan = plan_connections(arch.num_layers(anchor), [arch.num_layers(a) for a in augments], self.config)
        return CalmModel(anchor, augments, self.plan, self.config)

    @staticmethod
    def _check_models(anchor: PreTrainedModel, augments: list[PreTrainedModel]) -> None:
        if not augments:
            raise ValueError("calm needs at least one augmenting model: Composer(anchor, augment, strategy='calm')")
        for model in [anchor, *augments]:
            arch.get_family(model)  # unknown family: a clear error
        check_same_vocabulary(anchor, augments)

    def save(self, model: nn.Module, directory: Path) -> dict[str, Any]:
        if not isinstance(model, CalmModel):
            raise TypeError(f"calm saves a CalmModel, got {type(model).__name__}")
        tensors = {f"connections.{k}": v.detach().contiguous() for k, v in model.connections.state_dict().items()}
        save_file(tensors, str(Path(directory) / WEIGHTS_NAME))
        return {
            "plan": [list(p) for p in model.plan],
            "anchor_hidden_size": arch.hidden_size(model.anchor),
            "anchor_layers": arch.num_layers(model.anchor),
            "augment_hidden_sizes": [arch.hidden_size(a) for a in model.augments],
            "augment_layers": [arch.num_layers(a) for a in model.augments],
            "num_heads": model.connections[0].num_heads,
            "dtype": str(next(model.connections.parameters()).dtype).removeprefix("torch."),
        }

    def load(self, directory, state, anchor, augments) -> nn.Module:
        directory = Path(directory)
        if anchor is None:
            raise ValueError("calm.load needs the anchor model")
        if "augment_hidden_sizes" in state and len(augments) != len(state["augment_hidden_sizes"]):
            raise ValueError(
                f"{directory} was saved with {len(state['augment_hidden_sizes'])} augmenting model(s); "
                f"{len(augments)} given"
            )
        expected = {
            "anchor hidden size": (state.get("anchor_hidden_size"), arch.hidden_size(anchor)),
            "anchor layers": (state.get("anchor_layers"), arch.num_layers(anchor)),
        }
        for i, aug in enumerate(augments):
            if "augment_hidden_sizes" in state:
                expected[f"augmenting model {i} hidden size"] = (
                    state["augment_hidden_sizes"][i],
                    arch.hidden_size(aug),
                )
                expected[f"augmenting model {i} layers"] = (state["augment_layers"][i], arch.num_layers(aug))
        for what, (saved, given) in expected.items():
            if saved is not None and saved != given:
                raise ValueError(
                    f"{directory} does not fit the given models: saved {what} {saved}, given model has {given}"
                )
        if "plan" in state:
            self._check_models(anchor, augments)
            plan = [(int(a), int(la), INPUT if lb == INPUT else int(lb)) for a, la, lb in state["plan"]]
            n_anchor, n_augs = arch.num_layers(anchor), [arch.num_layers(a) for a in augments]
            for a, la, lb in plan:
                if not (0 <= a < len(augments) and 0 <= la < n_augs[a] and (lb == INPUT or 0 <= lb < n_anchor)):
                    raise ValueError(f"{directory}: connection {(a, la, lb)} does not fit the given models")
            self.plan = plan
            model = CalmModel(anchor, augments, plan, self.config)
        else:
            model = self.build(anchor, augments)
        path = directory / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}")
        tensors = load_file(str(path))
        own = {f"connections.{k}": v for k, v in model.connections.state_dict().items()}
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(f"{path} does not match the connections: missing {missing}, unexpected {unexpected}")
        for name, tensor in tensors.items():
            if tensor.shape != own[name].shape:
                raise ValueError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, the given models need {tuple(own[name].shape)}"
                )
        model.connections.load_state_dict({k.removeprefix("connections."): v for k, v in tensors.items()})
        return model
