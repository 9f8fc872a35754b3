"""The one typed validation layer: training options, generation options, and the checks a run makes.

The API (:class:`~compose.Composer`), recipes and ``key=value`` overrides hand their options
to a typed config object where they come in (``TrainConfig``, a strategy's config, a recipe
section); the object checks them once, here, and then travels as is:

* the **type** comes from the config dataclass's annotation (see :mod:`compose.rules`);
* the **range** is declared once: next to the field for strategy options and recipe sections
  (``option(8, ge=1)``), and in :data:`compose.train.config.TRAIN_RULES` for
  :class:`compose.train.TrainConfig`.

Errors are :class:`OptionError` (a ``ValueError`` and a ``TypeError``) naming the option, the
value given and what is accepted. The checks of data files and token ids live in
:mod:`compose.datachecks` and are re-exported here.
"""

from __future__ import annotations

from typing import Any

from .datachecks import _is_tensor, check_data_file, check_token_ids, check_tokenizer_vocabulary, vocab_size
from .rules import (
    NON_NEGATIVE,
    POSITIVE,
    OptionError,
    Rule,
    check_names,
    check_value,
    fail,
    option,
    rules_of,
    validate_fields,
    validate_options,
)

__all__ = [
    "OptionError",
    "Rule",
    "option",
    "rules_of",
    "GENERATE_RULES",
    "check_value",
    "check_names",
    "validate_options",
    "validate_fields",
    "validate_generate_options",
    "validate_generate_inputs",
    "check_path_component",
    "check_token_ids",
    "check_data_file",
    "check_tokenizer_vocabulary",
    "vocab_size",
    "NON_NEGATIVE",
    "POSITIVE",
]

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


# ---------------------------------------------------------------------------- paths
def check_path_component(name: str, value: Any) -> str:
    """A name used as one directory level (a stage name): no separators, no ``.``/``..``, not empty."""
    if not isinstance(value, str) or not value.strip():
        raise fail(name, value, "a non-empty string")
    bad = value in (".", "..") or any(c in value for c in "/\\\0") or value != value.strip()
    if bad or value.startswith("~"):
        raise fail(name, value, "a single directory name (letters, digits, '-', '_', '.'; no '/', '..' or '~')")
    return value
