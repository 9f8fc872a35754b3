"""Options of the ``calm`` strategy and the connection plan they describe.

:class:`CalmOptions` holds what ``Composer(anchor, augment, strategy="calm", **options)``
accepts; :func:`plan_connections` turns it into ``[(augment_index, augment_layer,
anchor_layer), ...]`` for given models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from ...rules import option
from ..base import StrategyConfig

__all__ = ["INPUT", "CalmOptions", "plan_connections", "check_same_vocabulary", "anchor_target"]

#: The anchor "layer" of a connection that feeds the input of the anchor's first block (its
#: embedding output) instead of the output of a block. ``"embed"`` is accepted as a synonym.
INPUT = "input"
_INPUT_NAMES = ("input", "embed")


@dataclass
class CalmOptions(StrategyConfig):
    """Options of the ``calm`` strategy (what ``Composer(..., strategy="calm", **options)`` takes).

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
            (a stabiliser some re-implementations use; off in the paper). On by default: with the
            paper's plan it learned the most of the options measured (docs/results.md, section 2);
            ``norm=False`` gives the paper's cross-attention exactly.
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

    every: int = option(4, ge=1)
    connections: list | None = None
    num_heads: int | None = option(None, ge=1)
    norm: bool = True
    gate: bool = False
    window: int | None = option(None, ge=1)
    null_kv: bool = False
    out_scale: float | None = option(None, gt=0)

    def __post_init__(self) -> None:
        super().__post_init__()
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


def anchor_target(b: Any) -> int | str:
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
    return [[[int(a), anchor_target(b)] for a, b in group] for group in groups]


def plan_connections(
    anchor_layers: int, augment_layers: list[int], config: CalmOptions
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


def check_same_vocabulary(
    anchor: PreTrainedModel, augments: list[PreTrainedModel], tokenizers: list | None = None, first_index: int = 0
):
    """``ValueError`` unless the anchor and every augmenting model share a vocabulary.

    Compares ``config.vocab_size`` always, and the tokenizers' vocabularies when they are
    known: passed in ``tokenizers`` (anchor first), or saved in the local directory a
    model was loaded from. Same-vocabulary CALM aligns positions token by token, so a
    different tokenizer would silently pair unrelated tokens; an augmenting model with its own
    tokenizer is composed by characters instead when that tokenizer is given. ``first_index``
    is the index of ``augments[0]`` (for messages).
    """
    v_anchor = anchor.config.vocab_size
    for index, aug in enumerate(augments, first_index):
        if aug.config.vocab_size != v_anchor:
            raise ValueError(
                f"vocabulary mismatch: the anchor has {v_anchor} tokens, augmenting model {index} has "
                f"{aug.config.vocab_size}. Either use an augmenting model with the anchor's tokenizer, or pass "
                "both tokenizers (tokenizer=anchor_tokenizer, augment_tokenizer=its_tokenizer) to compose "
                "across tokenizers"
            )
    if tokenizers is None:
        tokenizers = [_local_tokenizer(m) for m in [anchor, *augments]]
    if tokenizers and tokenizers[0] is not None:
        reference = tokenizers[0].get_vocab()
        for index, tok in enumerate(tokenizers[1:], first_index):
            if tok is not None and tok.get_vocab() != reference:
                raise ValueError(
                    f"tokenizer mismatch: augmenting model {index}'s tokenizer has a different vocabulary than the "
                    "anchor's; pass it as augment_tokenizer= to compose across tokenizers"
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
