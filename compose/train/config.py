"""The options of a training run (:class:`TrainConfig`), what it returns (:class:`TrainResult`),
and its learning-rate schedule."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from .. import rules
from ..rules import NON_NEGATIVE, POSITIVE, Rule, fail, option
from ..trackers import check_report_to


@dataclass
class TrainConfig:
    """Options of :meth:`Composer.fit`. Every field is a keyword of ``fit``."""

    max_steps: int = option(
        1000, help="Optimizer steps to run (each = ``batch_size * gradient_accumulation_steps * processes`` sequences)."
    )
    learning_rate: float = option(2e-4, help="Peak learning rate (LLaMA Pro: 2e-4).")
    batch_size: int = option(8, help="Sequences per micro-batch per process.")
    seq_len: int = option(2048, help="Tokens per sequence; packed documents are cut to this length.")
    output_dir: str | None = option(
        None, help="Where checkpoints, metrics and the final model go; ``None`` keeps nothing on disk."
    )
    gradient_accumulation_steps: int = option(1, help="Micro-batches summed into one optimizer step.")
    warmup_ratio: float = option(
        0.06, help="Fraction of ``max_steps`` spent warming the learning rate up linearly (LLaMA Pro: 6%)."
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = option("cosine", help="Decay after warmup.")
    min_lr_ratio: float = option(0.0, help="Floor of the decay, as a fraction of the peak.")
    weight_decay: float = option(0.1, help="Decoupled (AdamW) weight decay, applied to matrices only.")
    adam_betas: tuple[float, float] = option((0.9, 0.95), help="AdamW betas.")
    adam_eps: float = option(1e-8, help="AdamW epsilon.")
    max_grad_norm: float | None = option(1.0, help="Clip the gradient norm to this (``None``/0: no clipping).")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto", help="``auto``: bf16 on a GPU that has it, fp16 on older GPUs, fp32 on CPU."
    )
    gradient_checkpointing: bool = option(
        False, help="Recompute activations in the backward pass (non-reentrant, so frozen inputs work)."
    )
    chunked_loss: bool = option(
        True,
        help=(
            "Compute the LM-head loss in chunks, never holding the full tokens x vocab logits (plain models of the "
            "supported families; others use the model's own loss)."
        ),
    )
    loss_chunk_tokens: int = option(4096, help="Tokens per chunk of the chunked loss.")
    eval_every: int = option(0, help="Evaluate every N steps (0: only at the end, when eval data is given).")
    eval_batches: int | None = option(None, help="Cap on eval micro-batches per evaluation (``None``: all).")
    save_every: int = option(0, help="Checkpoint every N steps (0: only the final step). Needs ``output_dir``.")
    keep_checkpoints: int = option(2, help="How many recent checkpoints to keep.")
    resume: bool | str = option(
        False,
        help=(
            "``True``: continue from the latest checkpoint in ``output_dir`` (fresh start if none); or a checkpoint"
            " path."
        ),
    )
    overwrite_output_dir: bool = option(
        False, help="Allow a fresh run into an ``output_dir`` that already holds checkpoints (they are deleted)."
    )
    save_final: bool = option(True, help="Write the trained model with ``Composer.save`` to ``output_dir/final``.")
    seed: int = option(0, help="Seeds data order and initialisation-time randomness.")
    log_every: int = option(10, help="Log loss / learning rate / throughput every N steps.")
    report_to: str | list[str] | None = option(
        "auto",
        help=(
            "accelerate trackers (``tensorboard``, ``wandb``, ``mlflow`` ...): a name, a list, ``auto`` "
            "(tensorboard when installed and ``output_dir`` is set) or ``None``; they log what ``metrics.jsonl`` "
            "holds (see compose.trackers)."
        ),
    )
    packing: bool = option(True, help="Join documents with EOS and cut into ``seq_len`` blocks (else pad each record).")
    mask_prompt: bool = option(
        True,
        help=(
            "For ``prompt``/``completion`` records, train only on the completion; for ``messages``, only on the "
            "assistant's turns (``False``: on every token)."
        ),
    )
    text_field: str = option("text", help="Record field holding the text.")
    progress: bool = option(True, help="Show a tqdm progress bar (main process only).")
    streaming: bool = option(
        False,
        help=(
            "Tokenize and pack the training data on the fly from an ``IterableDataset`` (each process reads its own"
            " shard, the position is checkpointed); for corpora too big to prepare on disk first."
        ),
    )
    num_proc: int | None = option(
        None,
        help="Worker processes for tokenizing and packing (``datasets.map(num_proc=...)``); ``None``: this process.",
    )
    data_cache_dir: str | None = option(
        None,
        help="Where ``datasets`` keeps the Arrow files and the cached tokenized/packed data (default: its own cache).",
    )
    packing_attention: Literal["block", "document"] = option(
        "block",
        help=(
            "``block``: causal over the whole packed block, so a token also sees the earlier documents of its "
            "block; ``document``: a token attends only to its own document, on every attention implementation "
            "(positions restart at each document; with SDPA on CPU 1.05-1.4x the step time of ``block``, "
            "docs/performance.md)."
        ),
    )
    reset_position_ids: bool = option(
        False, help='Older name of ``packing_attention="document"`` (``True`` turns it on).'
    )
    chat_template: str | None = option(
        None,
        help=(
            "For ``messages`` records: a built-in template name (chatml, tulu, tiny), one of the tokenizer's named "
            "templates, a ``.jinja`` file or the Jinja text; default: the tokenizer's own chat template."
        ),
    )
    on_nonfinite: Literal["error", "skip"] = option(
        "error",
        help=(
            "A NaN/inf loss or gradient: ``error`` stops with an error naming the step; ``skip`` drops that step's "
            "update and counts it (``skipped_steps`` in the metrics)."
        ),
    )
    callbacks: list[Any] = option(
        default_factory=list,
        repr=False,
        help="Callables ``cb(step, metrics)`` run after every optimizer step on every process.",
    )

    def __post_init__(self) -> None:
        checked = validate_train_options({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        for name, value in checked.items():
            setattr(self, name, value)
        if self.resume and self.output_dir is None and not isinstance(self.resume, str):
            raise ValueError("resume=True needs output_dir (where the checkpoints are)")
        if self.save_every and self.output_dir is None:
            raise ValueError(
                f"save_every={self.save_every} writes checkpoints into output_dir, which is not set: pass "
                "output_dir=... or leave save_every at 0 (nothing is written without output_dir)"
            )
        self.adam_betas = tuple(self.adam_betas)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(
                f"unknown training option(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(sorted(names))}"
            )
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "callbacks"}


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    model: nn.Module
    """The trained model, unwrapped from accelerate (on the main process it holds the full weights)."""
    history: list[dict[str, float]]
    """Logged metrics, one dict per logged step."""
    step: int = 0
    """Optimizer steps done (``max_steps`` unless stopped)."""
    skipped_steps: int = 0
    """Steps whose update was dropped by ``on_nonfinite='skip'``."""
    resumed_from: str | None = None
    """The checkpoint this run continued from."""


_SCHEDULER_NAMES = {"cosine": "cosine_with_min_lr", "linear": "warmup_stable_decay", "constant": "constant_with_warmup"}


def make_scheduler(optimizer, config: TrainConfig):
    """``transformers.get_scheduler`` for ``config``: warmup, then cosine/linear decay to ``min_lr_ratio``."""
    from transformers import get_scheduler

    warmup = int(config.warmup_ratio * config.max_steps)
    kwargs: dict[str, Any] = {}
    if config.lr_scheduler == "cosine":
        kwargs = {"min_lr_rate": config.min_lr_ratio}
    elif config.lr_scheduler == "linear" and config.min_lr_ratio > 0:
        # warmup_stable_decay: its warmup starts from the floor rather than from 0
        decay = max(1, config.max_steps - warmup)
        kwargs = {"num_decay_steps": decay, "min_lr_ratio": config.min_lr_ratio, "decay_type": "linear"}
    name = _SCHEDULER_NAMES[config.lr_scheduler]
    if config.lr_scheduler == "linear" and config.min_lr_ratio == 0:
        name = "linear"
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=config.max_steps,
        scheduler_specific_kwargs=kwargs,
    )


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


def validate_train_options(options: dict[str, Any]) -> dict[str, Any]:
    """The keyword options of ``Composer.fit`` checked against :class:`~compose.train.TrainConfig`."""
    out = rules.validate_options(TrainConfig, options, rules=TRAIN_RULES, what="training option")
    if out.get("max_grad_norm") == 0:
        raise fail("max_grad_norm", 0, "a number > 0 (use None for no clipping)")
    if "callbacks" in out and not all(callable(cb) for cb in out["callbacks"]):
        raise fail("callbacks", out["callbacks"], "a list of callables cb(step, metrics)")
    if "report_to" in out:
        check_report_to(out["report_to"])  # names only; whether each is installed is checked when training starts
    return out
