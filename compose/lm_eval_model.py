"""``lm_eval --model compose``: any model compose wrote, CALM included, from lm-evaluation-harness's CLI.

::

    lm_eval --model compose --model_args pretrained=runs/calm/final --tasks arc_easy,hellaswag

``pretrained`` is a directory written by :meth:`Composer.save` / ``compose train`` (its
``final/``), a CALM ``save_pretrained`` directory, or a plain checkpoint (``compose export``,
or any transformers model: then this is lm-eval's own ``hf`` model). compose loads it - base
models named in the directory included - and hands the model and its tokenizer to the
harness's ``HFLM``, so the prompts, metrics and batching are the harness's own.

``--model_args`` beyond ``pretrained``: ``anchor=`` / ``augment=`` (base models to use instead
of those recorded, e.g. after moving them), ``dtype=`` (``bfloat16`` ...), ``device=``
(``cuda``, ``cpu``), ``tokenizer=``, and every ``HFLM`` option (``max_length``,
``add_bos_token`` ...). lm-eval finds this class by the ``lm_eval.models`` entry point compose
installs (see ``_compose_lm_eval.py``); importing this module also registers it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

__all__ = ["ComposeLM"]


def _is_compose_directory(path: Path) -> bool:
    from .saved import CONFIG_NAME
    from .strategies import STRATEGIES

    if not path.is_dir():
        return False
    return (path / CONFIG_NAME).is_file() or any(cls.is_pretrained_dir(path) for cls in STRATEGIES.values())


@register_model("compose")
class ComposeLM(HFLM):
    """lm-eval's ``HFLM`` over a model compose loads (see the module docstring)."""

    def __init__(
        self,
        pretrained: Any,
        tokenizer: Any = None,
        anchor: str | None = None,
        augment: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        path = Path(str(pretrained)).expanduser()
        if not isinstance(pretrained, str) or not _is_compose_directory(path):
            if (anchor, augment) != (None, None):
                raise ValueError(f"anchor= / augment= apply to a directory compose wrote; {pretrained!r} is not one")
            # a plain checkpoint or hub id: exactly lm-eval's own "hf" model
            options = {k: v for k, v in (("dtype", dtype), ("device", device)) if v is not None}
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, **options, **kwargs)
            return
        from .recipe import load_output

        options: dict[str, Any] = {"tokenizer": tokenizer}
        if dtype not in (None, "auto"):
            options["dtype"] = dtype
        if anchor is not None:
            options["anchor"] = anchor
        if augment is not None:
            options["augment"] = augment.split("+") if isinstance(augment, str) else augment
        composer = load_output(path, **options)
        if composer.tokenizer is None:
            raise ValueError(
                f"{path} has no tokenizer and none was found beside its anchor: pass one in --model_args "
                "(tokenizer=PATH_OR_HUB_ID)"
            )
        if device is not None:
            composer.model.to(device)
        # HFLM warns that device / parallelize options do not apply to a loaded model; they were applied here.
        hf_logger = logging.getLogger("lm_eval.models.huggingface")
        level = hf_logger.level
        hf_logger.setLevel(logging.ERROR)
        try:
            super().__init__(pretrained=composer.model, tokenizer=composer.tokenizer, **kwargs)
        finally:
            hf_logger.setLevel(level)
        self.composer = composer
