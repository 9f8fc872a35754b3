"""The training loop, on accelerate.

One loop serves every strategy: it trains exactly the parameters whose
``requires_grad`` is set (and gives only those to the optimizer), so the frozen models
are untouched by construction.

Features: bf16/fp16 autocast when a GPU is there (trainable tensors kept in fp32),
gradient accumulation, non-reentrant gradient checkpointing (works with frozen inputs),
warmup + cosine/linear/constant schedule, decoupled weight decay on matrices only,
clipping, periodic eval loss, a tqdm bar, accelerate trackers (tensorboard when
installed), atomic checkpoints of the *trainable* tensors + optimizer + schedule + RNG,
and ``resume`` that continues a killed run to the same weights as an uninterrupted one.

Data order is a pure function of ``(seed, step)``: micro-batch ``g`` takes rows
``g*B*W ... (g+1)*B*W - 1`` of an endless stream of seeded permutations, rank ``r``
the ``r``-th slice of ``B`` rows. Resuming therefore needs no data-loader state.
Under ``accelerate launch`` the model is wrapped by accelerate (DDP; FSDP/DeepSpeed
through their accelerate configs, see docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from . import arch
from .data import IGNORE, TokenBlocks, build_blocks, collate
from .io import atomic_directory, read_json, write_json

if TYPE_CHECKING:
    from .composer import Composer

__all__ = ["TrainConfig", "train", "latest_checkpoint"]

CHECKPOINT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d+)$")
# Fields that fix the data order and the schedule: a resumed run must keep them.
_RESUME_INVARIANT = ("batch_size", "gradient_accumulation_steps", "seq_len", "seed", "packing", "max_steps")


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
    """accelerate trackers: ``auto`` (tensorboard when installed and ``output_dir`` is set), a name, a list, or ``None``."""
    packing: bool = True
    """Join documents with EOS and cut into ``seq_len`` blocks (else pad each record)."""
    mask_prompt: bool = True
    """For ``prompt``/``completion`` records, train only on the completion."""
    text_field: str = "text"
    """Record field holding the text."""
    progress: bool = True
    """Show a tqdm progress bar (main process only)."""
    callbacks: list[Any] = field(default_factory=list, repr=False)
    """Callables ``cb(step, metrics)`` run after every optimizer step on every process."""

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in (
            "max_steps",
            "batch_size",
            "seq_len",
            "gradient_accumulation_steps",
            "keep_checkpoints",
            "loss_chunk_tokens",
        ):
            positive(name)
        for name in ("eval_every", "save_every", "log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr_scheduler not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr_scheduler must be cosine, linear or constant, got {self.lr_scheduler!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.resume and self.output_dir is None and not isinstance(self.resume, str):
            raise ValueError("resume=True needs output_dir (where the checkpoints are)")
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


# ---------------------------------------------------------------------------- helpers
def _lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based)."""
    warmup = int(config.warmup_ratio * config.max_steps)
    if step < warmup:
        return (step + 1) / warmup
    if config.lr_scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, config.max_steps - warmup)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if config.lr_scheduler == "cosine" else 1 - progress
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * decay


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


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints`` (complete = atomically renamed)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    found = [(s, p) for s, p in found if (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def _save_checkpoint(path: Path, model: nn.Module, optimizer, step: int, config: TrainConfig, world: int) -> None:
    from safetensors.torch import save_file

    with atomic_directory(path) as tmp:
        tensors = {
            n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad
        }
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / "rng.pt")
        write_json(
            tmp / "trainer_state.json",
            {"step": step, "world_size": world, "config": config.to_dict()},
        )


def _save_sharded_checkpoint(accelerator, path: Path, step: int, config: TrainConfig, world: int) -> None:
    """accelerate's collective save into a hidden folder, renamed by the main process once all wrote."""
    import shutil

    tmp = path.parent / f".{path.name}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "trainer_state.json", {"step": step, "world_size": world, "config": config.to_dict()})
        os.replace(tmp, path)


def _load_checkpoint(path: Path, model: nn.Module, optimizer, config: TrainConfig, world: int) -> int:
    from safetensors.torch import load_file

    state = read_json(path / "trainer_state.json")
    saved = state["config"]
    changed = [k for k in _RESUME_INVARIANT if k in saved and _jsonable(saved[k]) != _jsonable(getattr(config, k))]
    if state.get("world_size", 1) != world:
        changed.append(f"number of processes ({state.get('world_size')} -> {world})")
    if changed:
        raise ValueError(
            f"cannot resume from {path}: these settings differ from the interrupted run: {', '.join(changed)}. "
            "Resume with the same settings, or start a new output_dir."
        )
    tensors = load_file(str(path / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        raise ValueError(
            f"checkpoint {path} holds trainable tensors {sorted(set(tensors) ^ set(params))[:5]} that do not match "
            "the model being trained: was it written by another strategy or model?"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return int(state["step"])


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


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters: the strategy froze everything")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _resolve_mixed_precision(value: str) -> str:
    if value != "auto":
        return value
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _has_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps is not None and mps.is_available())


def _trackers(config: TrainConfig) -> list[str] | None:
    if config.report_to in (None, "none", [], ()):
        return None
    if config.report_to == "auto":
        if config.output_dir is None:
            return None
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return None
        return ["tensorboard"]
    return [config.report_to] if isinstance(config.report_to, str) else list(config.report_to)


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
            hidden = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
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


@torch.no_grad()
def eval_loss_sums(
    model: nn.Module,
    blocks: TokenBlocks,
    batch_size: int,
    device,
    *,
    rank: int = 0,
    world: int = 1,
    max_batches: int | None = None,
    autocast=None,
) -> tuple[float, int]:
    """Summed next-token loss and token count over this process's share of ``blocks``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    idx = list(range(rank, len(blocks), world))
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    if max_batches is not None:
        batches = batches[:max_batches]
    try:
        for rows in batches:
            batch = {k: v.to(device) for k, v in collate([blocks[i] for i in rows]).items()}
            ctx = autocast() if autocast is not None else torch.autocast(device_type="cpu", enabled=False)
            with ctx:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            loss = nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=IGNORE,
                reduction="sum",
            )
            total += float(loss)
            count += int((labels != IGNORE).sum())
    finally:
        model.train(was_training)
    return total, count


# ---------------------------------------------------------------------------- the loop
def train(composer: Composer, train_data: Any, eval_data: Any, config: TrainConfig) -> list[dict[str, float]]:
    """Train ``composer.model``'s trainable parameters; returns the logged metrics."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    model = composer.model
    model_config = _model_config(model)
    limit = arch.max_positions(model_config)
    if limit is not None and config.seq_len > limit:
        raise ValueError(
            f"seq_len={config.seq_len} is beyond the model's {limit} positions (max_position_embeddings); "
            f"use seq_len <= {limit}"
        )
    output_dir = Path(config.output_dir) if config.output_dir else None
    resume_from: Path | None = None
    if isinstance(config.resume, str):
        resume_from = Path(config.resume)
        if not (resume_from / "trainer_state.json").is_file():
            raise FileNotFoundError(f"resume={config.resume!r} is not a checkpoint directory (no trainer_state.json)")
    elif config.resume and output_dir is not None:
        resume_from = latest_checkpoint(output_dir)
    elif output_dir is not None and latest_checkpoint(output_dir) is not None and not config.overwrite_output_dir:
        raise ValueError(
            f"{output_dir} already holds checkpoints; pass resume=True to continue that run, "
            "overwrite_output_dir=True to start over, or use a new output_dir"
        )

    pad_id = getattr(model_config, "pad_token_id", None)
    pad_id = pad_id if isinstance(pad_id, int) and pad_id >= 0 else 0

    def blocks_of(data: Any) -> TokenBlocks:
        return build_blocks(
            data,
            composer.tokenizer,
            config.seq_len,
            packing=config.packing,
            mask_prompt=config.mask_prompt,
            text_field=config.text_field,
            pad_token_id=pad_id,
        )

    blocks = blocks_of(train_data)
    eval_blocks = blocks_of(eval_data) if eval_data is not None else None

    trackers = _trackers(config)
    accelerator = Accelerator(
        # Without this, processes started by torchrun / `accelerate launch --multi_gpu` on a
        # machine with no GPU would each train alone instead of joining a gloo group.
        cpu=not _has_accelerator(),
        mixed_precision=_resolve_mixed_precision(config.mixed_precision),
        log_with=trackers,
        project_dir=str(output_dir) if output_dir else None,
    )
    set_seed(config.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    # FSDP / DeepSpeed shard parameters and optimizer state across processes: checkpoints then go
    # through accelerate's collective save_state/load_state instead of compose's own small format.
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    # Master copies of trainable tensors in fp32 even when the frozen base is bf16/fp16.
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    if config.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    model.to(accelerator.device)
    model.train()

    groups = _param_groups(model, config.weight_decay)
    fused = accelerator.device.type == "cuda" and all(p.dtype == torch.float32 for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(
        groups, lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps, fused=fused or None
    )
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    chunked = (
        ChunkedLoss(accelerator.unwrap_model(wrapped), config.loss_chunk_tokens)
        if config.chunked_loss and not sharded and ChunkedLoss.supports(accelerator.unwrap_model(wrapped))
        else None
    )

    step = 0
    if resume_from is not None:
        if sharded:
            accelerator.load_state(str(resume_from))
            step = int(read_json(resume_from / "trainer_state.json")["step"])
        else:
            step = _load_checkpoint(resume_from, accelerator.unwrap_model(wrapped), optimizer, config, world)
        if main and output_dir is not None:
            _truncate_metrics(output_dir / "metrics.jsonl", step)
        accelerator.print(f"compose: resumed from {resume_from} at step {step}/{config.max_steps}")
    if output_dir is not None and main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if not config.resume and config.overwrite_output_dir and (output_dir / CHECKPOINT_DIR).exists():
            import shutil

            shutil.rmtree(output_dir / CHECKPOINT_DIR)
    if trackers:
        accelerator.init_trackers("compose", config={k: str(v) for k, v in config.to_dict().items()})

    order = _Order(len(blocks), config.seed)
    per_step = config.batch_size * world
    history: list[dict[str, float]] = []
    metrics_path = output_dir / "metrics.jsonl" if output_dir is not None else None
    bar = None
    if config.progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.max_steps, initial=step, desc=f"fit {composer.strategy_name}", dynamic_ncols=True)

    def log(entry: dict[str, float]) -> None:
        history.append(entry)
        if trackers:
            accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=int(entry["step"]))
        if main and metrics_path is not None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def run_eval() -> float | None:
        if eval_blocks is None:
            return None
        total, count = eval_loss_sums(
            wrapped,
            eval_blocks,
            config.batch_size,
            accelerator.device,
            rank=rank,
            world=world,
            max_batches=config.eval_batches,
            autocast=accelerator.autocast,
        )
        t = accelerator.reduce(torch.tensor([total, float(count)], device=accelerator.device), reduction="sum")
        return float(t[0] / t[1].clamp(min=1))

    tokens_seen, t0, loss_acc = 0, time.perf_counter(), 0.0
    while step < config.max_steps:
        lr = config.learning_rate * _lr_factor(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(config.gradient_accumulation_steps):
            g = step * config.gradient_accumulation_steps + micro
            rows = order.rows(g * per_step + rank * config.batch_size, config.batch_size)
            batch = {k: v.to(accelerator.device) for k, v in collate([blocks[i] for i in rows]).items()}
            last = micro == config.gradient_accumulation_steps - 1
            ctx = accelerator.no_sync(wrapped) if (world > 1 and not last) else _nullcontext()
            with ctx, accelerator.autocast():
                loss = chunked(wrapped, batch) if chunked is not None else wrapped(**batch).loss
                loss = loss / config.gradient_accumulation_steps
            accelerator.backward(loss)
            loss_sum += float(loss.detach())
            tokens_seen += int(batch["attention_mask"].sum()) * world
        if config.max_grad_norm:
            grad_norm = accelerator.clip_grad_norm_(wrapped.parameters(), config.max_grad_norm)
        else:
            grad_norm = None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_acc += loss_sum
        entry = {"step": step, "loss": loss_sum, "lr": lr}
        if grad_norm is not None:
            entry["grad_norm"] = float(grad_norm)
        if config.eval_every and step % config.eval_every == 0 and step < config.max_steps:
            entry["eval_loss"] = run_eval()
        if step == config.max_steps and eval_blocks is not None:
            entry["eval_loss"] = run_eval()
        if step % max(1, config.log_every) == 0 or step == config.max_steps or "eval_loss" in entry:
            elapsed = time.perf_counter() - t0
            entry["tokens_per_s"] = tokens_seen / max(elapsed, 1e-9)
            log(entry)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{entry['lr']:.2e}")
        for cb in config.callbacks:
            cb(step, entry)
        if output_dir is not None and (
            (config.save_every and step % config.save_every == 0) or step == config.max_steps
        ):
            accelerator.wait_for_everyone()
            if main:
                _save_checkpoint(
                    output_dir / CHECKPOINT_DIR / f"step-{step:07d}",
                    accelerator.unwrap_model(wrapped),
                    optimizer,
                    step,
                    config,
                    world,
                )
                _prune_checkpoints(output_dir, config.keep_checkpoints)
            accelerator.wait_for_everyone()
    if bar is not None:
        bar.close()
    if trackers:
        accelerator.end_training()
    composer.model = accelerator.unwrap_model(wrapped)
    if config.gradient_checkpointing and hasattr(composer.model, "gradient_checkpointing_disable"):
        composer.model.gradient_checkpointing_disable()
        if hasattr(composer.model.config, "use_cache"):
            composer.model.config.use_cache = True
    composer.model.eval()
    if output_dir is not None and config.save_final:
        accelerator.wait_for_everyone()
        if sharded:
            # Gather the full weights (collective), then write them from the main process.
            full = accelerator.get_state_dict(wrapped)
            if main:
                composer.model.load_state_dict(full, strict=False, assign=True)
        if main:
            composer.save(output_dir / "final")
        accelerator.wait_for_everyone()
    return history


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
