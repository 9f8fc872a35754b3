"""The training loop, on accelerate, in pieces: setup, resume, step, evaluate, checkpoint.

:func:`train` receives a model and data and returns a :class:`TrainResult`; it trains
exactly the parameters whose ``requires_grad`` is set (only those reach the optimizer), so
frozen models are untouched by construction. ``Composer.fit`` is a thin caller.

Features: bf16/fp16 autocast (on a GPU, and on CPU when the frozen weights are bf16/fp16;
trainable tensors are kept in fp32), gradient accumulation, non-reentrant gradient
checkpointing, ``transformers.get_scheduler`` schedules (warmup, cosine with a floor,
linear, constant), decoupled weight decay on matrices only, clipping, a non-finite guard,
periodic eval loss, a tqdm bar, accelerate trackers, checkpoints with checksums, resume
that continues a killed run to the same weights as an uninterrupted one, and a checkpoint
on Ctrl-C.

Data order. Map-style data: a pure function of ``(seed, step)``: micro-batch ``g`` takes
rows ``g*B*W ... (g+1)*B*W - 1`` of an endless stream of seeded permutations, rank ``r``
the ``r``-th slice of ``B`` rows. Streaming data: each process reads its own shard in
order; its exact position is stored in every checkpoint.

Checkpoints (``output_dir/checkpoints/step-N``) are the same for every distributed type
(one process, DDP, FSDP2, DeepSpeed ZeRO): the full state of the *trainable* tensors, the optimizer state
keyed by parameter name (safetensors + JSON), the scheduler, the RNG, the data position,
and last a ``manifest.json`` with the sha256 of every file. Nothing is unpickled on resume.
FSDP2 state is gathered and re-sharded with ``torch.distributed.checkpoint.state_dict``; ZeRO
state with DeepSpeed's ``safe_get_full_*`` / ``safe_set_full_*`` (fp32 masters, optimizer state).
Under DeepSpeed the engine does accumulation, clipping and the update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from . import arch, packing
from .data import IGNORE, TokenBlocks, build_blocks, check_cache_dir, stream_blocks
from .evaluate import eval_loss_sums
from .guards import check_batch_fits
from .io import atomic_directory, read_json, write_json
from .resume import check_fingerprints, check_resume_settings, data_fingerprint, model_fingerprint

__all__ = ["TrainConfig", "TrainResult", "train", "latest_checkpoint", "verify_checkpoint", "CheckpointError"]

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete or damaged (names the file)."""


@dataclass
class TrainConfig:
    """Options of :meth:`Composer.fit`. Every field is a keyword of ``fit``."""

    max_steps: int = 1000
    """Optimizer steps to run (each = ``batch_size * gradient_accumulation_steps * processes`` sequences)."""
    learning_rate: float = 2e-4
    """Peak learning rate (LLaMA Pro: 2e-4)."""
    batch_size: int = 8
    """Sequences per micro-batch per process."""
    seq_len: int = 2048
    """Tokens per sequence; packed documents are cut to this length."""
    output_dir: str | None = None
    """Where checkpoints, metrics and the final model go; ``None`` keeps nothing on disk."""
    gradient_accumulation_steps: int = 1
    """Micro-batches summed into one optimizer step."""
    warmup_ratio: float = 0.06
    """Fraction of ``max_steps`` spent warming the learning rate up linearly (LLaMA Pro: 6%)."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    min_lr_ratio: float = 0.0
    """Floor of the decay, as a fraction of the peak."""
    weight_decay: float = 0.1
    """Decoupled (AdamW) weight decay, applied to matrices only."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this (``None``/0: no clipping)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """``auto``: bf16 on a GPU that has it, fp16 on older GPUs, fp32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant, so frozen inputs work)."""
    chunked_loss: bool = True
    """Compute the LM-head loss in chunks, never holding the full tokens x vocab logits (plain models of
    the supported families; others use the model's own loss)."""
    loss_chunk_tokens: int = 4096
    """Tokens per chunk of the chunked loss."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end, when eval data is given)."""
    eval_batches: int | None = None
    """Cap on eval micro-batches per evaluation (``None``: all)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only the final step). Needs ``output_dir``."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    resume: bool | str = False
    """``True``: continue from the latest checkpoint in ``output_dir`` (fresh start if none); or a checkpoint path."""
    overwrite_output_dir: bool = False
    """Allow a fresh run into an ``output_dir`` that already holds checkpoints (they are deleted)."""
    save_final: bool = True
    """Write the trained model with ``Composer.save`` to ``output_dir/final``."""
    seed: int = 0
    """Seeds data order and initialisation-time randomness."""
    log_every: int = 10
    """Log loss / learning rate / throughput every N steps."""
    report_to: str | list[str] | None = "auto"
    """accelerate trackers (``tensorboard``, ``wandb``, ``mlflow`` ...): a name, a list, ``auto`` (tensorboard when
    installed and ``output_dir`` is set) or ``None``; they log what ``metrics.jsonl`` holds (see compose.trackers)."""
    packing: bool = True
    """Join documents with EOS and cut into ``seq_len`` blocks (else pad each record)."""
    mask_prompt: bool = True
    """For ``prompt``/``completion`` records, train only on the completion; for ``messages``, only on the
    assistant's turns (``False``: on every token)."""
    text_field: str = "text"
    """Record field holding the text."""
    progress: bool = True
    """Show a tqdm progress bar (main process only)."""
    streaming: bool = False
    """Tokenize and pack the training data on the fly from an ``IterableDataset`` (each process reads its own
    shard, the position is checkpointed); for corpora too big to prepare on disk first."""
    num_proc: int | None = None
    """Worker processes for tokenizing and packing (``datasets.map(num_proc=...)``); ``None``: this process."""
    data_cache_dir: str | None = None
    """Where ``datasets`` keeps the Arrow files and the cached tokenized/packed data (default: its own cache)."""
    packing_attention: Literal["block", "document"] = "block"
    """``block``: causal over the whole packed block, so a token also sees the earlier documents of its block;
    ``document``: a token attends only to its own document, on every attention implementation (positions
    restart at each document; with SDPA on CPU 1.05-1.4x the step time of ``block``, docs/performance.md)."""
    reset_position_ids: bool = False
    """Older name of ``packing_attention="document"`` (``True`` turns it on)."""
    chat_template: str | None = None
    """For ``messages`` records: a built-in template name (chatml, tulu, tiny), one of the tokenizer's named
    templates, a ``.jinja`` file or the Jinja text; default: the tokenizer's own chat template."""
    on_nonfinite: Literal["error", "skip"] = "error"
    """A NaN/inf loss or gradient: ``error`` stops with an error naming the step; ``skip`` drops that step's
    update and counts it (``skipped_steps`` in the metrics)."""
    callbacks: list[Any] = field(default_factory=list, repr=False)
    """Callables ``cb(step, metrics)`` run after every optimizer step on every process."""

    def __post_init__(self) -> None:
        # types and ranges: the one validation layer (compose.validation.TRAIN_RULES)
        from .validation import validate_train_options

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


# ---------------------------------------------------------------------------- schedule
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


# ---------------------------------------------------------------------------- helpers
def _model_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no .config; composed models expose their anchor's config")
    return config


class _Order:
    """Deterministic, resumable row order: an endless stream of seeded permutations."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def rows(self, start: int, count: int) -> list[int]:
        out = []
        for r in range(start, start + count):
            epoch, pos = divmod(r, self.n)
            if epoch not in self._perms:
                self._perms = {
                    epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                }
            out.append(int(self._perms[epoch][pos]))
        return out


class _OrderedBatches:
    """Micro-batches of map-style blocks; the position is the step itself, so there is no state."""

    def __init__(self, blocks: TokenBlocks, config: TrainConfig, rank: int, world: int):
        self.blocks, self.order = blocks, _Order(len(blocks), config.seed)
        self.size, self.rank, self.world = config.batch_size, rank, world

    def next(self, g: int) -> dict[str, torch.Tensor]:
        return self.blocks.batch(self.order.rows(g * self.size * self.world + self.rank * self.size, self.size))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class _StreamBatches:
    def __init__(self, stream, size: int):
        self.stream, self.size = stream, size

    def next(self, g: int) -> dict[str, torch.Tensor]:
        return self.stream.take(self.size)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters: the strategy froze everything")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _low_precision(model: nn.Module) -> torch.dtype | None:
    """bf16/fp16 when frozen floating-point weights are stored in it (else ``None``)."""
    dtypes = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    for dt in (torch.bfloat16, torch.float16):
        if dt in dtypes:
            return dt
    return None


def _resolve_mixed_precision(value: str) -> str:
    if value == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            "mixed_precision='fp16' needs a CUDA GPU: on this machine accelerate would quietly train in fp32. "
            "Use mixed_precision='bf16' (autocast on CPU) or 'no'"
        )
    if value != "auto":
        return value
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _has_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps is not None and mps.is_available())


def _trackers(config: TrainConfig) -> list[str] | None:
    from .trackers import resolve_trackers

    return resolve_trackers(config.report_to, config.output_dir)


def _model_inputs(batch: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Forward inputs; with per-document ``position_ids`` attention stays inside each document."""
    return packing.model_inputs(batch, model)


def _ce_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")


class ChunkedLoss:
    """Next-token loss computed chunk by chunk from the final hidden states.

    The model runs with its LM head swapped for an identity, so its "logits" are the final
    hidden states ``[B, T, D]``; the head and the cross-entropy then run on ``chunk`` tokens
    at a time under activation checkpointing, so at most ``chunk x vocab`` logits exist at
    once (in the forward and in the backward), and positions labelled ``-100`` cost nothing.
    Same value as the model's own mean loss over non-ignored tokens.
    """

    def __init__(self, model: nn.Module, chunk: int):
        self.model, self.chunk = model, chunk
        head = model.get_output_embeddings()
        self.head_name = next(name for name, child in model.named_children() if child is head)
        self.head = head

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Only plain causal LMs whose logits are exactly ``head(final hidden state)``."""
        if not isinstance(model, PreTrainedModel) or getattr(model.config, "model_type", None) not in arch.FAMILIES:
            return False
        config = model.config
        if getattr(config, "final_logit_softcapping", None) is not None or getattr(
            config, "output_router_logits", False
        ):
            return False
        head = model.get_output_embeddings()
        return head is not None and any(child is head for child in model.children())

    def __call__(self, wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        setattr(self.model, self.head_name, nn.Identity())
        try:
            hidden = wrapped(**_model_inputs(batch, wrapped)).logits
        finally:
            setattr(self.model, self.head_name, self.head)
        targets = batch["labels"][:, 1:].reshape(-1)
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        keep = targets != IGNORE
        hidden, targets = hidden[keep], targets[keep]
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, targets.numel(), self.chunk):
            total = total + checkpoint(
                _ce_sum, self.head, hidden[i : i + self.chunk], targets[i : i + self.chunk], use_reentrant=False
            )
        return total / max(targets.numel(), 1)


# ---------------------------------------------------------------------------- checkpoint files
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories under ``output_dir/checkpoints`` that were completely written, newest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True) if (p / MANIFEST).is_file()]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest completely written checkpoint under ``output_dir/checkpoints`` (not verified)."""
    found = _checkpoints(output_dir)
    return found[0] if found else None


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest; returns ``trainer_state.json``.

    Raises :class:`CheckpointError` naming the missing, truncated or altered file.
    """
    path = Path(path)
    try:
        manifest = read_json(path / MANIFEST)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / MANIFEST} is missing or unreadable ({e}): incomplete checkpoint") from e
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{f} does not match its checksum in {MANIFEST} (truncated or altered)")
    return read_json(path / "trainer_state.json")


def _tensor_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict (keyed by parameter name) into tensors and JSON."""
    tensors, plain = {}, {"state": {}, "param_groups": _jsonable(state["param_groups"])}
    for name, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}::{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                plain["state"].setdefault(name, {})[key] = value
    return tensors, plain


def _untensor_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {k: dict(v) for k, v in plain["state"].items()}
    for key, value in tensors.items():
        name, sub = key.rsplit("::", 1)
        state.setdefault(name, {})[sub] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def _write_checkpoint(tmp: Path, parts: dict[str, Any]) -> None:
    """Write one checkpoint's files into ``tmp``; the manifest (checksums) last."""
    from safetensors.torch import save_file

    save_file(parts["model"], str(tmp / "trainable.safetensors"))
    opt_tensors, opt_plain = _tensor_state(parts["optimizer"])
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    write_json(tmp / "optimizer.json", opt_plain)
    write_json(tmp / "scheduler.json", _jsonable(parts["scheduler"]))
    save_file(parts["rng"], str(tmp / "rng.safetensors"))
    write_json(tmp / "data.json", parts["data"])
    write_json(tmp / "trainer_state.json", parts["trainer_state"])
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    write_json(tmp / MANIFEST, {"files": files})


def _rng_state() -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after ``step`` by an interrupted run, so the resumed log reads as one run."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def _prune_checkpoints(output_dir: Path, keep: int) -> None:
    import shutil

    root = output_dir / CHECKPOINT_DIR
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)))
    for _, p in found[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def _first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


# ---------------------------------------------------------------------------- the loop
@dataclass
class _Run:
    """Everything one training run holds between its pieces."""

    config: TrainConfig
    model: nn.Module
    accelerator: Any
    wrapped: nn.Module
    optimizer: Any
    scheduler: Any
    batches: Any
    eval_blocks: TokenBlocks | None
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    autocast: Callable[[], Any]
    output_dir: Path | None
    sharded: bool
    desc: str = "fit"
    zero: int = 0
    """DeepSpeed ZeRO stage (0: not under DeepSpeed)."""
    step: int = 0
    skipped: int = 0
    tokens_seen: int = 0
    consistent: bool = True
    interrupted: bool = False
    saved_step: int = -1
    resumed_from: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)
    """Of the model and the training data, stored in checkpoints (see :mod:`compose.resume`)."""
    trackers: list[str] | None = None
    skeleton: nn.Module | None = None
    upcast: dict[str, torch.dtype] = field(default_factory=dict)
    bar: Any = None
    t0: float = field(default_factory=time.perf_counter)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def train(
    model: nn.Module,
    train_data: Any,
    eval_data: Any = None,
    config: TrainConfig | None = None,
    *,
    tokenizer: Any = None,
    save_model: Callable[[nn.Module, Path], Any] | None = None,
    desc: str = "fit",
) -> TrainResult:
    """Train ``model``'s trainable parameters on ``train_data``.

    ``save_model(model, directory)`` writes the final model (``Composer.save`` for a
    Composer; default ``model.save_pretrained``) to ``output_dir/final``.
    """
    config = config or TrainConfig()
    resume_from = _resume_candidates(config)
    prints = model_fingerprint(model) if config.output_dir is not None else {}
    run = _setup(model, train_data, eval_data, config, tokenizer, desc)
    if isinstance(run.batches, _OrderedBatches):
        check_batch_fits(len(run.batches.blocks), config.batch_size, run.world, config.seq_len)
    if prints and isinstance(run.batches, _OrderedBatches):
        prints.update(data_fingerprint(run.batches.blocks, train_data))
    run.fingerprints = prints
    with _sigint_deferred(run):
        try:
            _resume(run, resume_from)
            _start_logging(run)
            while run.step < config.max_steps:
                entry = _train_step(run)
                _after_step(run, entry)
        except KeyboardInterrupt:
            _checkpoint_on_interrupt(run)
            raise
        finally:
            _close(run)
    _finish(run, save_model)
    return TrainResult(run.model, run.history, run.step, run.skipped, run.resumed_from)


def _resume_candidates(config: TrainConfig) -> list[Path]:
    """Checkpoints to try, newest first (checked before anything is loaded or written)."""
    output_dir = Path(config.output_dir) if config.output_dir else None
    if isinstance(config.resume, str):
        path = Path(config.resume)
        if not (path / MANIFEST).is_file() and not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"resume={config.resume!r} is not a checkpoint directory (no {MANIFEST})")
        return [path]
    if output_dir is None:
        return []
    found = _checkpoints(output_dir)
    root = output_dir / CHECKPOINT_DIR
    legacy = sorted(p.name for p in root.glob("step-*") if p.is_dir() and p not in found) if root.is_dir() else []
    if config.resume and legacy and not found:
        raise CheckpointError(
            f"{root} holds checkpoints without {MANIFEST} ({', '.join(legacy[:3])}): written by an older compose, "
            "whose format this version cannot resume. Finish that run with the version that wrote it, or start "
            "over with overwrite_output_dir=True"
        )
    if config.resume:
        return found
    if (found or legacy) and not config.overwrite_output_dir:
        raise ValueError(
            f"{output_dir} already holds checkpoints; pass resume=True to continue that run, "
            "overwrite_output_dir=True to start over, or use a new output_dir"
        )
    return []


def _make_accelerator(config: TrainConfig, output_dir: Path | None):
    """An ``Accelerator`` for this run; a previous run's different ``mixed_precision`` is reset first."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision = _resolve_mixed_precision(config.mixed_precision)
    previous = AcceleratorState._shared_state.get("_mixed_precision")
    if previous is not None and previous != precision:
        # accelerate keeps one process-wide state and refuses a second precision; the process
        # group (PartialState) is kept, only the precision settings are dropped.
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        # Without this, processes started by torchrun / `accelerate launch --multi_gpu` on a
        # machine with no GPU would each train alone instead of joining a gloo group.
        cpu=not _has_accelerator(),
        mixed_precision=precision,
        log_with=_trackers(config),
        project_dir=str(output_dir) if output_dir else None,
    )
    _fsdp_on_cpu(accelerator)
    _deepspeed_on_cpu(accelerator)
    return accelerator


def _fsdp_on_cpu(accelerator) -> None:
    """Honour an FSDP launch (``ACCELERATE_USE_FSDP``) on a machine without GPUs.

    accelerate 1.x only turns a launch into FSDP from its multi-GPU modes; on CPU the
    processes join a gloo group as MULTI_CPU and the FSDP settings are silently dropped
    (plain DDP). The FSDP2 code (``fully_shard``) itself runs on CPU with gloo, so the
    accelerate state is switched to FSDP with the plugin read from the same environment.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    wants = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wants or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError(
            "FSDP on a machine without GPUs needs fsdp_version: 2 (FSDP1 has no CPU path); "
            "set it in the accelerate config or pass --fsdp_version 2"
        )
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def _deepspeed_on_cpu(accelerator) -> None:
    """Honour a DeepSpeed launch (``ACCELERATE_USE_DEEPSPEED``) on a machine without GPUs.

    As for FSDP, accelerate only enters DeepSpeed mode from its GPU modes and otherwise joins the
    processes as MULTI_CPU over gloo. DeepSpeed's CPU accelerator runs ZeRO over that same gloo
    group (it would use oneCCL only when installed), so the state is switched to DeepSpeed with a
    plugin read from the same launch settings.
    """
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    wants = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not wants or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    try:
        from deepspeed import comm as ds_comm
    except ImportError as e:
        raise ImportError(
            f"this run was launched with DeepSpeed but deepspeed cannot be imported ({e}); "
            "install it with `pip install 'compose-llm[deepspeed]'` or launch without --use_deepspeed"
        ) from e
    if not ds_comm.is_initialized():
        ds_comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(accelerator.state.mixed_precision)
    plugin.select(_from_accelerator_state=True)
    accelerator.state.distributed_type = DistributedType.DEEPSPEED
    accelerator.state.deepspeed_plugins = plugin


def _deepspeed_config(accelerator, config: TrainConfig) -> int:
    """Fill the DeepSpeed config from ``fit``'s options (compose's loop drives the engine); returns the ZeRO stage.

    A DeepSpeed config *file* may leave these entries ``auto`` or repeat fit's values; a different value
    is an error naming it. Without a file (launch flags, recipes/accelerate/zero*.yaml) fit's values are used.
    """
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    world, accum = accelerator.num_processes, config.gradient_accumulation_steps
    want = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": config.batch_size * accum * world,
        "gradient_clipping": float(config.max_grad_norm or 0.0),
    }
    from_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none") not in ("", "none")
    if from_file:
        bad = [f"{k}={ds[k]!r} (fit: {v!r})" for k, v in want.items() if ds.get(k, "auto") not in ("auto", v)]
        if bad:
            raise ValueError(
                f"the DeepSpeed config file sets {', '.join(bad)}; compose takes these from fit's batch_size, "
                'gradient_accumulation_steps and max_grad_norm: set them to "auto" in the file'
            )
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ValueError(
                f"the DeepSpeed config has a {key!r} section; compose builds its own AdamW and schedule from fit's "
                "options (learning_rate, lr_scheduler, ...): remove that section"
            )
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage not in (1, 2, 3):
        raise ValueError(f"DeepSpeed ZeRO stage {stage}: compose supports stages 1, 2 and 3 (for no sharding use DDP)")
    ds.update(want)
    return stage


def _make_data(model, train_data, eval_data, tokenizer, config: TrainConfig, rank: int, world: int):
    model_config = _model_config(model)
    limit = arch.max_positions(model_config)
    if limit is not None and config.seq_len > limit:
        raise ValueError(
            f"seq_len={config.seq_len} is beyond the model's {limit} positions (max_position_embeddings); "
            f"use seq_len <= {limit}"
        )
    pad = getattr(model_config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and pad >= 0 else 0
    opts = dict(
        packing=config.packing,
        mask_prompt=config.mask_prompt,
        text_field=config.text_field,
        pad_token_id=pad,
        reset_position_ids=config.reset_position_ids or config.packing_attention == "document",
        chat_template=config.chat_template,
    )
    extra = dict(num_proc=config.num_proc, cache_dir=config.data_cache_dir)
    with _datasets_progress(config.progress):
        return _build_data(train_data, eval_data, tokenizer, config, rank, world, opts, extra)


@contextlib.contextmanager
def _datasets_progress(show: bool):
    """``progress=False`` also silences datasets' tokenize/pack bars."""
    import datasets as ds_tqdm

    was_on = not ds_tqdm.are_progress_bars_disabled()
    if not show and was_on:
        ds_tqdm.disable_progress_bars()
    try:
        yield
    finally:
        if not show and was_on:
            ds_tqdm.enable_progress_bars()


def _build_data(train_data, eval_data, tokenizer, config: TrainConfig, rank: int, world: int, opts, extra):
    if config.streaming:
        if config.data_cache_dir is not None:
            check_cache_dir(config.data_cache_dir)
        batches = _StreamBatches(
            stream_blocks(train_data, tokenizer, config.seq_len, rank=rank, world=world, **opts), config.batch_size
        )
    else:
        batches = _OrderedBatches(
            build_blocks(train_data, tokenizer, config.seq_len, **opts, **extra), config, rank, world
        )
    evals = build_blocks(eval_data, tokenizer, config.seq_len, **opts, **extra) if eval_data is not None else None
    return batches, evals


def _prepare_model(model: nn.Module, config: TrainConfig, device) -> dict[str, torch.dtype]:
    """Ready ``model`` for training; returns the low-precision dtypes of the trainable tensors it upcast."""
    # Master copies of trainable tensors in fp32 even when the frozen base is bf16/fp16.
    upcast = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            upcast[name] = p.dtype
            p.data = p.data.float()
    if config.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    model.to(device)
    model.train()
    return upcast


def _setup(model, train_data, eval_data, config: TrainConfig, tokenizer, desc: str) -> _Run:
    from accelerate.utils import DistributedType, set_seed

    output_dir = Path(config.output_dir) if config.output_dir else None
    accelerator = _make_accelerator(config, output_dir)
    set_seed(config.seed)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    zero = _deepspeed_config(accelerator, config) if deepspeed else 0
    rank, world = accelerator.process_index, accelerator.num_processes
    batches, eval_blocks = _make_data(model, train_data, eval_data, tokenizer, config, rank, world)
    sharded = accelerator.distributed_type == DistributedType.FSDP
    low = _low_precision(model)
    upcast = _prepare_model(model, config, accelerator.device)
    groups = _param_groups(model, config.weight_decay)
    if zero:  # ZeRO flattens each group into one buffer: an empty group has none
        groups = [g for g in groups if g["params"]]
    fused = accelerator.device.type == "cuda" and all(p.dtype == torch.float32 for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(
        groups, lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps, fused=fused or None
    )
    skeleton = None
    if accelerator.distributed_type == DistributedType.FSDP:
        _fsdp_buffer_loading(accelerator, model)
    if sharded or zero == 3:
        skeleton = _meta_skeleton(model)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    if zero:
        accelerator.print(f"compose: training under DeepSpeed ZeRO-{zero} on {world} processes")
    scheduler = make_scheduler(optimizer, config)
    unwrapped = accelerator.unwrap_model(wrapped)
    chunked = None
    if config.chunked_loss and not sharded and zero != 3 and ChunkedLoss.supports(unwrapped):
        chunked = ChunkedLoss(unwrapped, config.loss_chunk_tokens)

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (
            chunked(wrapped, batch)
            if chunked is not None
            else wrapped(**_model_inputs(batch, wrapped), labels=batch["labels"]).loss
        )

    if accelerator.mixed_precision != "no" or low is None:
        autocast = accelerator.autocast
    else:  # frozen bf16/fp16 weights with fp32 trainable ones: compute in the frozen dtype
        autocast = lambda: torch.autocast(accelerator.device.type, dtype=low)  # noqa: E731
    return _Run(
        config, unwrapped, accelerator, wrapped, optimizer, scheduler, batches, eval_blocks, loss_fn, autocast,
        output_dir, sharded, desc, zero, trackers=_trackers(config), skeleton=skeleton, upcast=upcast,
    )  # fmt: skip


def _fsdp_buffer_loading(accelerator, model: nn.Module) -> None:
    """accelerate's FSDP2 ``cpu_ram_efficient_loading`` assumes every state-dict entry is a sharded
    parameter and fails on persistent buffers (CALM's per-connection ``scale``). compose has the
    full model on every process anyway, so that broadcast is switched off for such models."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or not getattr(plugin, "cpu_ram_efficient_loading", False):
        return
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = [n for n in model.state_dict() if n not in params]
    if buffers:
        plugin.cpu_ram_efficient_loading = False


def _meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (no memory), buffers real.

    FSDP2 turns the model itself into a sharded module whose ``state_dict`` always yields
    shards; the final full weights are loaded into this plain copy on the main process.
    """
    import copy

    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def _resume(run: _Run, candidates: list[Path]) -> None:
    """Load the newest good checkpoint of ``candidates``; a damaged one is skipped with a warning."""
    config = run.config
    if run.output_dir is not None and run.main:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        if not config.resume and config.overwrite_output_dir and (run.output_dir / CHECKPOINT_DIR).exists():
            import shutil

            shutil.rmtree(run.output_dir / CHECKPOINT_DIR)
    damaged = []
    for path in candidates:
        try:
            state = verify_checkpoint(path)
        except CheckpointError as e:
            if isinstance(config.resume, str):
                raise
            damaged.append(str(e))
            warnings.warn(f"compose: skipping damaged checkpoint: {e}; trying the previous one", stacklevel=3)
            continue
        check_resume_settings(path, state, config, run.world)
        _load_checkpoint(run, path, state)
        if run.main and run.output_dir is not None:
            _truncate_metrics(run.output_dir / "metrics.jsonl", run.step)
        run.resumed_from = str(path)
        run.accelerator.print(f"compose: resumed from {path} at step {run.step}/{config.max_steps}")
        return
    if damaged:
        raise CheckpointError(
            "no usable checkpoint to resume from: " + "; ".join(damaged) + ". Start over with overwrite_output_dir=True"
        )
    if config.resume and run.main and run.output_dir is not None:
        _truncate_metrics(run.output_dir / "metrics.jsonl", 0)  # starting from step 0: a killed run's lines go


def _load_checkpoint(run: _Run, path: Path, state: dict[str, Any]) -> None:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    tensors = load_file(str(path / "trainable.safetensors"))
    names = {n for n, p in run.model.named_parameters(remove_duplicate=False) if p.requires_grad}
    if set(tensors) != names:
        raise ValueError(
            f"checkpoint {path} holds trainable tensors {sorted(set(tensors) ^ names)[:5]} that do not match "
            "the model being trained: was it written by another strategy or model?"
        )
    check_fingerprints(path, state.get("fingerprints", {}), run.fingerprints)
    optim = _untensor_state(load_file(str(path / "optimizer.safetensors")), read_json(path / "optimizer.json"))
    if run.zero:
        _deepspeed_load(run, tensors, optim)
    else:
        set_model_state_dict(run.wrapped, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(run.wrapped, run.optimizer, optim, options=StateDictOptions(full_state_dict=True))
    run.scheduler.load_state_dict(read_json(path / "scheduler.json"))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    data = read_json(path / "data.json")
    run.batches.load_state_dict(data["ranks"][run.accelerator.process_index])
    run.step, run.skipped = int(state["step"]), int(state.get("skipped_steps", 0))
    run.saved_step = run.step


def _start_logging(run: _Run) -> None:
    if run.trackers:
        from .trackers import init_kwargs, project_name

        run.accelerator.init_trackers(
            project_name(run.trackers),
            config={k: str(v) for k, v in run.config.to_dict().items()},
            init_kwargs=init_kwargs(run.trackers, run.output_dir),
        )
    if run.config.progress and run.main:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=run.config.max_steps, initial=run.step, desc=run.desc, dynamic_ncols=True)
    run.t0 = time.perf_counter()


def _accumulate(run: _Run) -> tuple[float, float]:
    """Forward and backward of one step's micro-batches, then clipping; returns (loss, gradient norm)."""
    if run.zero:
        return _accumulate_deepspeed(run)
    config, acc = run.config, run.accelerator
    loss_sum = 0.0
    for micro in range(config.gradient_accumulation_steps):
        batch = run.batches.next(run.step * config.gradient_accumulation_steps + micro)
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        last = micro == config.gradient_accumulation_steps - 1
        sync = acc.no_sync(run.wrapped) if (run.world > 1 and not last) else contextlib.nullcontext()
        with sync, run.autocast():
            loss = run.loss_fn(batch) / config.gradient_accumulation_steps
        acc.backward(loss)
        loss_sum += float(loss.detach())
        run.tokens_seen += int(batch["attention_mask"].sum()) * run.world
    grad_norm = acc.clip_grad_norm_(run.wrapped.parameters(), config.max_grad_norm or math.inf)
    return loss_sum, float(grad_norm) if grad_norm is not None else 0.0


def _accumulate_deepspeed(run: _Run) -> tuple[float, float]:
    """The same through the DeepSpeed engine: it scales each micro-batch by the accumulation steps,
    reduces at the boundary, clips and updates in ``step`` (ZeRO itself drops the update when the
    gradient norm is not finite, so a step refused below was not applied)."""
    config, engine = run.config, run.wrapped
    accum, loss_sum = config.gradient_accumulation_steps, 0.0
    for micro in range(accum):
        batch = run.batches.next(run.step * accum + micro)
        batch = {k: v.to(run.accelerator.device) for k, v in batch.items()}
        engine.set_gradient_accumulation_boundary(micro == accum - 1)
        with run.autocast():
            loss = run.loss_fn(batch)
        engine.backward(loss)
        loss_sum += float(loss.detach()) / accum
        run.tokens_seen += int(batch["attention_mask"].sum()) * run.world
    engine.step()
    grad_norm = engine.get_global_grad_norm()
    return loss_sum, float(grad_norm) if grad_norm is not None else 0.0


def _train_step(run: _Run) -> dict[str, float]:
    """One optimizer step: accumulate micro-batches, guard against non-finite values, update."""
    config = run.config
    lr = run.scheduler.get_last_lr()[0]
    loss_sum, grad_norm = _accumulate(run)
    bad = _any_rank(run, not (math.isfinite(loss_sum) and math.isfinite(grad_norm)))
    entry: dict[str, float] = {"step": run.step + 1, "loss": loss_sum, "lr": lr}
    if config.max_grad_norm:
        entry["grad_norm"] = grad_norm
    run.consistent = False
    if bad and config.on_nonfinite == "error":
        run.optimizer.zero_grad(set_to_none=True)
        run.consistent = True
        raise FloatingPointError(
            f"non-finite training values at step {run.step + 1} (loss {loss_sum}, gradient norm {grad_norm}); "
            "nothing of this step was applied or saved. Lower learning_rate, check max_grad_norm and the data, "
            "or pass on_nonfinite='skip' to skip such steps"
        )
    if bad:
        run.skipped += 1
        entry["skipped_steps"] = run.skipped
    else:
        run.optimizer.step()
    with warnings.catch_warnings():  # a skipped step still advances the schedule
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step", category=UserWarning)
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.consistent = True
    return entry


def _any_rank(run: _Run, flag: bool) -> bool:
    if run.world == 1:
        return flag
    t = run.accelerator.reduce(torch.tensor([float(flag)], device=run.accelerator.device), reduction="sum")
    return bool(t.item() > 0)


def _evaluate(run: _Run) -> float | None:
    if run.eval_blocks is None:
        return None
    total, count = eval_loss_sums(
        run.wrapped,
        run.eval_blocks,
        run.config.batch_size,
        run.accelerator.device,
        rank=run.accelerator.process_index,
        world=run.world,
        max_batches=run.config.eval_batches,
        autocast=run.autocast,
    )
    t = run.accelerator.reduce(torch.tensor([total, float(count)], device=run.accelerator.device), reduction="sum")
    return float(t[0] / t[1].clamp(min=1))


def _after_step(run: _Run, entry: dict[str, float]) -> None:
    """Evaluate, log, run callbacks, checkpoint; a deferred Ctrl-C is honoured here."""
    config, step = run.config, run.step
    if (config.eval_every and step % config.eval_every == 0) or step == config.max_steps:
        if run.eval_blocks is not None:
            entry["eval_loss"] = _evaluate(run)
    if step % max(1, config.log_every) == 0 or step == config.max_steps or "eval_loss" in entry:
        entry["tokens_per_s"] = run.tokens_seen / max(time.perf_counter() - run.t0, 1e-9)
        _log(run, entry)
    if run.bar is not None:
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}")
    for cb in config.callbacks:
        cb(step, entry)
    due = (config.save_every and step % config.save_every == 0) or step == config.max_steps
    if run.output_dir is not None and due:
        _save_checkpoint(run)
    if _any_rank(run, run.interrupted):
        _checkpoint_on_interrupt(run)
        raise KeyboardInterrupt(f"training interrupted at step {step}")


def _log(run: _Run, entry: dict[str, float]) -> None:
    run.history.append(entry)
    if run.trackers:
        run.accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=int(entry["step"]))
    if run.main and run.output_dir is not None:
        with open(run.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")


def _gather_state(run: _Run) -> dict[str, Any]:
    """The full trainable state of every distributed type (a collective: every process calls it)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    if run.zero:
        model, optimizer = _deepspeed_gather(run)
    else:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        model = get_model_state_dict(run.wrapped, options=options)
        optimizer = get_optimizer_state_dict(run.wrapped, run.optimizer, options=options)
    data = [run.batches.state_dict()]
    if run.world > 1:
        from accelerate.utils import gather_object

        data = gather_object(data)
    names = {n for n, p in run.model.named_parameters(remove_duplicate=False) if p.requires_grad}
    model = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.items() if k in names}
    return {"model": model, "optimizer": optimizer, "data": {"ranks": _jsonable(data)}}


def _zero_parts(run: _Run):
    """ZeRO's optimizer, the torch optimizer it steps, and ``(group index, flat fp32 buffer, model
    parameters in it)`` for each buffer: one per group in ZeRO-1/2, one per sub-group in ZeRO-3."""
    zero = run.optimizer.optimizer
    if hasattr(zero, "bit16_groups"):
        flats = zip(range(len(zero.bit16_groups)), zero.single_partition_of_fp32_groups, zero.bit16_groups)
    elif hasattr(zero, "fp32_partitioned_groups_flat"):
        ids = [zero.sub_group_to_group_id[s] for s in range(len(zero.fp16_groups))]
        flats = zip(ids, zero.fp32_partitioned_groups_flat, zero.fp16_groups)
    else:
        raise RuntimeError(
            f"compose cannot read the partitions of {type(zero).__name__} (this DeepSpeed version or ZeRO mode "
            "is not supported by compose's checkpoints)"
        )
    return zero, zero.optimizer, list(flats)


def _zero_link_state(zero) -> None:
    """ZeRO-1/2 link each parameter to its slice of the optimizer state once, right after the first
    group's first update, so groups updated after it stay unlinked; link again now that all exist."""
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _deepspeed_gather(run: _Run) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable tensors (fp32 masters) and their optimizer state, in full and keyed by parameter
    name, assembled from ZeRO's partitions (a collective: every process calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero, inner, flats = _zero_parts(run)
    names: dict[int, list[str]] = {}
    for n, p in run.model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    first = inner.state.get(flats[0][1], {})  # empty until a first update
    keys = [k for k, v in first.items() if torch.is_tensor(v) and v.shape == flats[0][1].shape]
    scalars = {k: v for k, v in first.items() if k not in keys}
    if keys:
        _zero_link_state(zero)
    model, state = {}, {}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in inner.param_groups]
    for index, _, params in flats:
        for p in params:
            shape = getattr(p, "ds_shape", p.shape)
            value = safe_get_full_fp32_param(p).detach().reshape(shape).to("cpu").clone()
            entry = {k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()}
            for k in keys:
                entry[k] = safe_get_full_optimizer_state(p, k).detach().reshape(shape).to("cpu").clone()
            for n in names[id(p)]:
                model[n], state[n] = value, entry
                groups[index]["params"].append(n)
    return model, {"state": state, "param_groups": groups}


def _deepspeed_load(run: _Run, tensors: dict[str, torch.Tensor], optim: dict[str, Any]) -> None:
    """Put checkpointed trainable tensors and optimizer state back into ZeRO's partitions."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero, inner, flats = _zero_parts(run)
    device = run.accelerator.device
    params = [(n, p) for n, p in run.model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0, enabled=run.zero == 3):
        with torch.no_grad():
            for n, p in params:
                p.copy_(tensors[n].to(p.dtype))
    for n, p in params:
        safe_set_full_fp32_param(p, tensors[n].to(device))
    if optim["state"]:
        sample = next(iter(optim["state"].values()))
        keys = [k for k, v in sample.items() if torch.is_tensor(v) and v.ndim > 0]
        for _, flat, _ in flats:  # AdamW creates its state lazily: lay it out first, then fill it
            inner.state[flat] = {k: v.clone() if torch.is_tensor(v) else v for k, v in sample.items()}
            inner.state[flat].update({k: torch.zeros_like(flat) for k in keys})
        _zero_link_state(zero)
        for n, p in params:
            for k in keys:
                safe_set_full_optimizer_state(p, optim["state"][n][k].to(device), k)
    for group, saved in zip(inner.param_groups, optim["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})


def _save_checkpoint(run: _Run) -> None:
    """Write ``checkpoints/step-N`` atomically (every process takes part, the main one writes)."""
    run.accelerator.wait_for_everyone()
    parts = _gather_state(run)
    bad = _first_nonfinite(parts["model"]) if run.main else None
    if _any_rank(run, bad is not None):
        raise FloatingPointError(
            f"parameter {bad or '(on the main process)'} holds non-finite values after step {run.step}: "
            "checkpoint not written (the previous ones are kept); lower learning_rate or check the data"
        )
    if run.main:
        parts["scheduler"] = run.scheduler.state_dict()
        parts["rng"] = _rng_state()
        parts["trainer_state"] = {
            "step": run.step,
            "skipped_steps": run.skipped,
            "world_size": run.world,
            "config": run.config.to_dict(),
            "fingerprints": run.fingerprints,
        }
        with atomic_directory(run.output_dir / CHECKPOINT_DIR / f"step-{run.step:07d}") as tmp:
            _write_checkpoint(tmp, parts)
        _prune_checkpoints(run.output_dir, run.config.keep_checkpoints)
    run.saved_step = run.step
    run.accelerator.wait_for_everyone()


def _checkpoint_on_interrupt(run: _Run) -> None:
    """Ctrl-C: keep the last completed step (one process; a group does it from :func:`_after_step`)."""
    if run.output_dir is None or run.saved_step == run.step or not run.consistent or run.step == 0:
        return
    if run.world > 1 and not run.interrupted:
        return
    run.optimizer.zero_grad(set_to_none=True)
    _save_checkpoint(run)
    run.accelerator.print(f"compose: interrupted; checkpoint written at step {run.step}")


@contextlib.contextmanager
def _sigint_deferred(run: _Run):
    """The first Ctrl-C only sets a flag, honoured after the current step; a second one interrupts at once."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if run.interrupted:
            raise KeyboardInterrupt
        run.interrupted = True
        run.accelerator.print("compose: Ctrl-C: stopping after this step (press again to stop now)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _fill_skeleton(skeleton: nn.Module, full: dict[str, torch.Tensor]) -> nn.Module:
    skeleton.load_state_dict(full, strict=False, assign=True)
    missing = [n for n, p in skeleton.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"the gathered FSDP state has no values for {missing[:5]}: cannot save the final model")
    if hasattr(skeleton, "tie_weights"):
        skeleton.tie_weights()
    return skeleton.eval()


def _restore_dtypes(model: nn.Module, upcast: dict[str, torch.dtype]) -> None:
    """Trained tensors go back to the model's own bf16/fp16 (they trained as fp32 masters), so that
    the model runs, evaluates and saves in one dtype."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in upcast:
                p.data = p.data.to(upcast[name])


def _close(run: _Run) -> None:
    if run.bar is not None:
        run.bar.close()
    if run.trackers:
        from .trackers import finish

        finish(run.accelerator)


def _fsdp_full_state(run: _Run) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(run.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _deepspeed_full_state(run: _Run) -> dict[str, torch.Tensor]:
    """Every ZeRO-3 parameter in full on the main process, one at a time (trainable ones from the fp32 masters)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    full = {}
    for name, p in run.model.named_parameters():
        if p.requires_grad:
            value = safe_get_full_fp32_param(p)
        else:
            with deepspeed.zero.GatheredParameters([p]):
                value = p.data.clone()
        if run.main:
            full[name] = value.detach().reshape(p.ds_shape).to("cpu").clone()
    return full


def _finish(run: _Run, save_model: Callable[[nn.Module, Path], Any] | None) -> None:
    """Unwrap, gather the full weights when sharded, refuse non-finite ones, save ``final``."""
    config, model = run.config, run.model
    if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = True
    model.eval()
    gathered = run.sharded or run.zero == 3
    if not gathered:
        _restore_dtypes(model, run.upcast)
    if run.output_dir is None or not config.save_final:
        return
    run.accelerator.wait_for_everyone()
    if gathered:
        # collective: the main process gets the full weights, frozen ones included
        full = _deepspeed_full_state(run) if run.zero else _fsdp_full_state(run)
        if run.main and run.skeleton is not None:
            model = run.model = _fill_skeleton(run.skeleton, full)
            _restore_dtypes(model, run.upcast)
        elif run.main:
            model.load_state_dict(full, strict=False, assign=True)
    bad = _first_nonfinite({n: p for n, p in model.named_parameters() if p.requires_grad}) if run.main else None
    if _any_rank(run, bad is not None):
        raise FloatingPointError(
            f"parameter {bad or '(on the main process)'} holds non-finite values: the final model was not saved"
        )
    if run.main:
        (save_model or (lambda m, d: m.save_pretrained(d)))(model, run.output_dir / "final")
    run.accelerator.wait_for_everyone()
