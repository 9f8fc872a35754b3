"""The one typed validation layer: strategy options, training options, generation options.

The API (:class:`~compose.Composer`), recipes and ``key=value`` overrides all pass their
options through here before any config object is built, so a value is checked once, the
same way, wherever it comes from:

* the **type** comes from the config dataclass's annotation (``bool`` must be a bool, not
  ``"no"``; ``int`` an int, not ``1.7`` or ``True``; ``float`` a finite number, not
  ``"1e-3"`` or ``nan``; ``Literal[...]`` one of its values; ``X | None``, ``list[X]``,
  ``tuple[X, Y]`` element by element);
* the **range** comes from one table per config (:data:`TRAIN_RULES`,
  :data:`STRATEGY_RULES`, ...).

Adding an option to a config dataclass needs nothing here when its annotation says it all
(a bool, a list of strings); one line in the matching table gives it a range
(``"num_proc": Rule(ge=1)``). Errors are :class:`OptionError` (a ``ValueError`` and a
``TypeError``) naming the option, the value given and what is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

__all__ = [
    "OptionError",
    "Rule",
    "TRAIN_RULES",
    "STRATEGY_RULES",
    "GENERATE_RULES",
    "check_value",
    "validate_options",
    "validate_train_options",
    "validate_strategy_options",
    "check_strategy_against_model",
    "validate_generate_options",
    "validate_generate_inputs",
    "check_path_component",
    "check_token_ids",
    "check_data_file",
    "check_tokenizer_vocabulary",
    "vocab_size",
]


class OptionError(ValueError, TypeError):
    """An option with a wrong name, type or value; the message names it and what is accepted."""


@dataclass(frozen=True)
class Rule:
    """Range of a number (``gt``/``ge``/``lt``/``le``), applied after the type check."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    note: str = ""
    """Extra advice appended to the error (e.g. "use None for no clipping")."""

    def describe(self) -> str:
        parts = []
        if self.gt is not None:
            parts.append(f"> {self.gt:g}")
        if self.ge is not None:
            parts.append(f">= {self.ge:g}")
        if self.lt is not None:
            parts.append(f"< {self.lt:g}")
        if self.le is not None:
            parts.append(f"<= {self.le:g}")
        return " and ".join(parts)

    def holds(self, x: float) -> bool:
        return not (
            (self.gt is not None and not x > self.gt)
            or (self.ge is not None and not x >= self.ge)
            or (self.lt is not None and not x < self.lt)
            or (self.le is not None and not x <= self.le)
        )


POSITIVE = Rule(ge=1)
NON_NEGATIVE = Rule(ge=0)

#: Ranges of :class:`compose.train.TrainConfig` options (types come from its annotations).
TRAIN_RULES: dict[str, Rule] = {
    "max_steps": POSITIVE,
    "learning_rate": Rule(gt=0),
    "batch_size": POSITIVE,
    "seq_len": POSITIVE,
    "gradient_accumulation_steps": POSITIVE,
    "warmup_ratio": Rule(ge=0, lt=1),
    "min_lr_ratio": Rule(ge=0, le=1),
    "weight_decay": NON_NEGATIVE,
    "adam_betas": Rule(ge=0, lt=1),
    "adam_eps": Rule(gt=0),
    "max_grad_norm": Rule(gt=0, note="use None for no clipping"),
    "loss_chunk_tokens": POSITIVE,
    "eval_every": NON_NEGATIVE,
    "eval_batches": Rule(ge=1, note="use None for all batches"),
    "save_every": NON_NEGATIVE,
    "keep_checkpoints": POSITIVE,
    "seed": NON_NEGATIVE,
    "log_every": NON_NEGATIVE,
    "num_proc": POSITIVE,
}

#: Ranges of each strategy's options (types come from the config class's annotations).
STRATEGY_RULES: dict[str, dict[str, Rule]] = {
    "block_expand": {"num_blocks": POSITIVE},
    "calm": {"every": POSITIVE, "num_heads": POSITIVE, "window": POSITIVE, "out_scale": Rule(gt=0)},
    "lora": {"r": POSITIVE, "alpha": Rule(gt=0), "dropout": Rule(ge=0, lt=1)},
    "full": {},
}

#: Ranges of :meth:`Composer.generate` options that compose checks before ``transformers`` sees them.
GENERATE_RULES: dict[str, Rule] = {
    "max_new_tokens": POSITIVE,
    "min_new_tokens": NON_NEGATIVE,
    "num_beams": POSITIVE,
    "num_return_sequences": POSITIVE,
    "temperature": Rule(gt=0),
    "top_p": Rule(gt=0, le=1),
    "top_k": NON_NEGATIVE,
    "repetition_penalty": Rule(gt=0),
}
_GENERATE_TYPES: dict[str, Any] = {
    "max_new_tokens": int,
    "min_new_tokens": int,
    "num_beams": int,
    "num_return_sequences": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "repetition_penalty": float,
    "do_sample": bool,
    "use_cache": bool,
}


# ---------------------------------------------------------------------------- types
_NAMES = {bool: "true/false", int: "an integer", float: "a finite number", str: "a string"}
_PLURALS = {bool: "true/false values", int: "integers", float: "finite numbers", str: "strings"}


def _type_name(tp: Any, plural: bool = False) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "None"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        named = " or ".join(_type_name(a, plural) for a in args if a is not type(None))
        return named + (", or None" if type(None) in args else "")
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and len(args) == 2 and args[0] == args[1]:
            return f"a pair of {_type_name(args[0], True)}"
        return f"a {origin.__name__} of {_type_name(args[0], True)}" if args else f"a {origin.__name__}"
    if origin is dict or tp is dict:
        return "a mapping"
    table = _PLURALS if plural else _NAMES
    return table.get(tp, getattr(tp, "__name__", str(tp)))


def _describe(tp: Any, rule: Rule | None) -> str:
    """What is accepted, in words: ``an integer >= 1, or None (use None for all batches)``."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    optional = type(None) in args
    main = [a for a in args if a is not type(None)]
    text = " or ".join(_type_name(a) for a in main) or "None"
    if rule is not None and rule.describe():
        seq = any(typing.get_origin(a) in (list, tuple) for a in main)
        text += f" (each {rule.describe()})" if seq else f" {rule.describe()}"
    if optional and main:
        text += ", or None"
    if rule is not None and rule.note:
        text += f" ({rule.note})"
    return text


def _fail(name: str, value: Any, accepted: str) -> OptionError:
    shown = f"{value!r} ({type(value).__name__})" if isinstance(value, str) else repr(value)
    return OptionError(f"{name}={shown} is not accepted; expected {accepted}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _matches(value: Any, tp: Any) -> tuple[bool, Any]:
    """``(ok, normalised value)`` for ``value`` against the annotation ``tp`` (no ranges)."""
    if tp is Any or tp is object:
        return True, value
    origin = typing.get_origin(tp)
    if tp is type(None):
        return value is None, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, out = _matches(value, arg)
            if ok:
                return True, out
        return False, value
    if origin is typing.Literal:
        return (value in typing.get_args(tp) and not isinstance(value, bool)), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is float:
        ok = _is_number(value) and math.isfinite(value)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, tuple) or tp in (list, tuple):
        return _matches_sequence(value, tp, origin or tp)
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value  # an annotation this layer does not interpret: left to the config class


def _matches_sequence(value: Any, tp: Any, origin: type) -> tuple[bool, Any]:
    if not isinstance(value, (list, tuple)):
        return False, value
    args = typing.get_args(tp)
    if not args:
        return True, list(value) if origin is list else tuple(value)
    if origin is tuple and Ellipsis not in args:
        if len(value) != len(args):
            return False, value
        pairs = list(zip(value, args))
    else:
        pairs = [(v, args[0]) for v in value]
    out = []
    for v, a in pairs:
        ok, norm = _matches(v, a)
        if not ok:
            return False, value
        out.append(norm)
    return True, out if origin is list else tuple(out)


def _numbers_in(value: Any) -> list[float]:
    if _is_number(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if _is_number(v)]
    return []


def check_value(name: str, value: Any, tp: Any, rule: Rule | None = None) -> Any:
    """Check one option against its annotation and range; return the normalised value."""
    ok, out = _matches(value, tp)
    if not ok or (rule is not None and not all(rule.holds(x) for x in _numbers_in(out))):
        raise _fail(name, value, _describe(tp, rule))
    return out


# ---------------------------------------------------------------------------- configs
def _hints(cls: type) -> dict[str, Any]:
    """Field annotations, resolved one by one: one unresolvable annotation leaves the others checked."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - fall back to field by field below
        pass
    import sys

    namespace = {**vars(typing), **vars(sys.modules.get(cls.__module__, typing))}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        try:
            out[f.name] = eval(f.type, namespace) if isinstance(f.type, str) else f.type  # noqa: S307 - annotations
        except Exception:  # noqa: BLE001 - left to the config class
            continue
    return out


def validate_options(
    cls: type,
    options: dict[str, Any],
    *,
    rules: dict[str, Rule] | None = None,
    what: str = "option",
    owner: str = "",
) -> dict[str, Any]:
    """Check ``options`` against the fields of dataclass ``cls``; return them normalised.

    Unknown names are errors listing the accepted ones (and the closest match).
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise OptionError(
            f"unknown {what}(s) {', '.join(map(repr, unknown))}{owner}{hint}; accepted: {', '.join(sorted(fields))}"
        )
    hints = _hints(cls)
    rules = rules or {}
    return {name: check_value(name, value, hints.get(name, Any), rules.get(name)) for name, value in options.items()}


def validate_train_options(options: dict[str, Any]) -> dict[str, Any]:
    """The keyword options of ``Composer.fit`` checked against :class:`~compose.train.TrainConfig`."""
    from .train import TrainConfig

    out = validate_options(TrainConfig, options, rules=TRAIN_RULES, what="training option")
    if out.get("max_grad_norm") == 0:
        raise _fail("max_grad_norm", 0, "a number > 0 (use None for no clipping)")
    if "callbacks" in out and not all(callable(cb) for cb in out["callbacks"]):
        raise _fail("callbacks", out["callbacks"], "a list of callables cb(step, metrics)")
    if "report_to" in out:
        from .trackers import check_report_to

        check_report_to(out["report_to"])  # names only; whether each is installed is checked when training starts
    return out


def validate_strategy_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """A strategy's keyword options checked against its config class; unknown names listed."""
    from .strategies.base import get_strategy

    config_class = get_strategy(name).config_class
    return validate_options(
        config_class, options, rules=STRATEGY_RULES.get(name, {}), what="option", owner=f" for strategy {name!r}"
    )


def check_strategy_against_model(name: str, config: Any, model_config: Any) -> None:
    """Checks that need the anchor's config, run before anything is built (so before memory grows)."""
    from . import arch

    if name == "block_expand":  # the strategy's own plan holds the rule (num_blocks, placement range)
        from .strategies.block_expand import plan_insertions

        plan_insertions(arch.num_layers(model_config), config)


def validate_generate_options(
    options: dict[str, Any], *, prompt_length: int | None = None, max_positions: int | None = None
) -> dict[str, Any]:
    """Types and ranges of generation options, and ``prompt + max_new_tokens`` within the positions."""
    out = dict(options)
    for key, value in options.items():
        if key in _GENERATE_TYPES and value is not None:
            out[key] = check_value(key, value, _GENERATE_TYPES[key], GENERATE_RULES.get(key))
    new = out.get("max_new_tokens")
    if isinstance(new, int) and max_positions is not None:
        total = new + (prompt_length or 0)
        if total > max_positions:
            room = max(0, max_positions - (prompt_length or 0))
            raise OptionError(
                f"max_new_tokens={new} is not accepted: prompt ({prompt_length or 0} tokens) + new tokens = {total} "
                f"is beyond the model's {max_positions} positions; expected max_new_tokens <= {room}"
            )
    return out


def validate_generate_inputs(input_ids: Any, attention_mask: Any = None, *, vocab: int | None = None) -> None:
    """Prompts for ``generate``: ids in the vocabulary, padding on the left only.

    Decoding continues after the last position of every row, so a row padded at its end
    (right padding, or a batch padded on both sides) would continue from padding and give
    different tokens than the same prompt alone.
    """
    if not _is_tensor(input_ids) or input_ids.dim() != 2:
        raise OptionError(f"input_ids must be a 2-d tensor [batch, tokens], got {type(input_ids).__name__}")
    import torch

    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise OptionError(f"input_ids must hold integer token ids (torch.long), got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise OptionError(
            f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one prompt token per row "
            "(e.g. the tokenizer's BOS)"
        )
    check_token_ids(input_ids, vocab, "input_ids")
    if attention_mask is None:
        return
    if not _is_tensor(attention_mask) or attention_mask.shape != input_ids.shape:
        raise OptionError(f"attention_mask must be a tensor of the shape of input_ids {tuple(input_ids.shape)}")
    right = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
    if right:
        raise OptionError(
            f"attention_mask: row(s) {right[:5]} are padded at the end; generation continues from the last position, "
            "so pad prompts on the left (tokenizer.padding_side = 'left')"
        )


# ---------------------------------------------------------------------------- token ids
def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def vocab_size(model: Any) -> int | None:
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except Exception:  # noqa: BLE001 - a composite without input embeddings: use the config
        size = getattr(getattr(model, "config", None), "vocab_size", None)
        return size if isinstance(size, int) else None


def check_tokenizer_vocabulary(tokenizer: Any, model: Any) -> None:
    """A tokenizer that can produce ids the model has no embedding for is an error now, not at step 1."""
    if tokenizer is None or not hasattr(tokenizer, "__len__"):
        return
    vocab = vocab_size(model)
    if vocab is not None and len(tokenizer) > vocab:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has {len(tokenizer)} tokens but the model's embedding has {vocab} rows: ids "
            f">= {vocab} would index past it. Use the tokenizer that belongs to the model (tokenizer=...), or "
            "resize the model's embeddings before composing"
        )


def check_token_ids(data: Any, vocab: int | None, name: str) -> None:
    """Token ids given directly (``input_ids`` records, token blocks) must lie in ``[0, vocab)``."""
    if vocab is None or data is None:
        return
    tensor = data if _is_tensor(data) else getattr(data, "input_ids", None)
    if _is_tensor(data):
        items: list[tuple[str, Any]] = [(name, data)]
    elif _is_tensor(tensor):
        items = [(f"{name}.input_ids", tensor)]
    elif isinstance(data, (list, tuple)) and data and all(isinstance(r, dict) for r in data):
        items = [(f"{name}[{i}]", r.get("input_ids")) for i, r in enumerate(data)]
    else:
        return
    for where, ids in items:
        if ids is None:
            continue
        t = ids if _is_tensor(ids) else None
        if t is None:
            if not isinstance(ids, (list, tuple)) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in ids
            ):
                raise OptionError(f"{where}: input_ids must be a list of integer token ids, got {str(ids)[:60]}")
            if not ids:
                continue
            low, high = min(ids), max(ids)
        elif t.numel() == 0:
            continue
        else:
            low, high = int(t.min()), int(t.max())
        if low < 0 or high >= vocab:
            bad = high if high >= vocab else low
            raise OptionError(
                f"{where}: token id {bad} is outside the model's vocabulary (valid ids: 0..{vocab - 1}); "
                "were these ids made with another tokenizer?"
            )


# ---------------------------------------------------------------------------- data files
def check_data_file(path: Any, text_field: str = "text") -> None:
    """A local .txt/.jsonl/.json data file must be UTF-8 and hold some text (and .jsonl one JSON object per
    line, its ``text_field`` a string).

    Read as a stream, so the check costs one pass over the file and no memory; the error
    names the file, the byte offset and the line.
    """
    import codecs
    import json
    import os
    from pathlib import Path

    if not isinstance(path, (str, os.PathLike)):
        return
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json") or not p.is_file():
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, content = 0, False
    if suffix == ".txt":  # read in blocks: one line may be a whole (huge) document
        return _check_text_file(p, decoder)
    with open(p, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = decoder.decode(raw)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{p}: not UTF-8 text at byte {offset + e.start} (line {number}); re-save the file as UTF-8"
                ) from None
            content = content or bool(text.strip())
            if suffix == ".jsonl" and text.strip():
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{number}: not a JSON record ({e.msg} at column {e.colno})") from None
                _check_json_record(p, number, record, text_field)
            offset += len(raw)
    if not content:
        raise ValueError(f"{p} is empty: it holds no text to train or evaluate on")


def _check_text_file(p: Any, decoder: Any) -> None:
    offset, lines, content = 0, 1, False
    with open(p, "rb") as f:
        while raw := f.read(1 << 20):
            try:
                text = decoder.decode(raw)
            except UnicodeDecodeError as e:
                line = lines + raw[: e.start].count(b"\n")
                raise ValueError(
                    f"{p}: not UTF-8 text at byte {offset + e.start} (line {line}); re-save the file as UTF-8"
                ) from None
            content = content or bool(text.strip())
            offset, lines = offset + len(raw), lines + raw.count(b"\n")
    if not content:
        raise ValueError(f"{p} is empty: it holds no text to train or evaluate on")


def _check_json_record(path: Any, number: int, record: Any, text_field: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(
            f"{path}:{number}: a JSON {type(record).__name__}, not a record; each line must be an object such as "
            '{"text": "..."} or {"input_ids": [...]}'
        )
    value = record.get(text_field)
    if value is not None and not isinstance(value, str):
        raise ValueError(
            f"{path}:{number}: {text_field!r} is {value!r:.40} ({type(value).__name__}); expected a string"
        )


# ---------------------------------------------------------------------------- paths
def check_path_component(name: str, value: Any) -> str:
    """A name used as one directory level (a stage name): no separators, no ``.``/``..``, not empty."""
    if not isinstance(value, str) or not value.strip():
        raise _fail(name, value, "a non-empty string")
    bad = value in (".", "..") or any(c in value for c in "/\\\0") or value != value.strip()
    if bad or value.startswith("~"):
        raise _fail(name, value, "a single directory name (letters, digits, '-', '_', '.'; no '/', '..' or '~')")
    return value
