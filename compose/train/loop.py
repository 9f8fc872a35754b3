"""The training loop: :func:`train` sets a run up, resumes it, steps, evaluates, checkpoints and
finishes it; read top to bottom.

Under DeepSpeed the engine does accumulation, clipping and the update.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..evaluate import eval_loss_sums
from ..guards import check_batch_fits
from ..resume import data_fingerprint, model_fingerprint
from .batches import _make_data, _OrderedBatches
from .checkpoint import _checkpoint_on_interrupt, _first_nonfinite, _resume, _resume_candidates, _save_checkpoint
from .config import TrainConfig, TrainResult, make_scheduler
from .distributed import (
    _deepspeed_config,
    _deepspeed_full_state,
    _fill_skeleton,
    _fsdp_buffer_loading,
    _fsdp_full_state,
    _make_accelerator,
    _meta_skeleton,
    _trackers,
)
from .loss import ChunkedLoss, _model_inputs
from .run import _any_rank, _Run


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
    trainable_groups = [list(g["params"]) for g in groups]  # the optimizer and ZeRO rewrite the groups
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
        output_dir, sharded, desc, zero, trainable_groups=trainable_groups,
        trackers=_trackers(config), skeleton=skeleton, upcast=upcast,
    )  # fmt: skip


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


def _start_logging(run: _Run) -> None:
    if run.trackers:
        from ..trackers import init_kwargs, project_name

        run.accelerator.init_trackers(
            project_name(run.trackers),
            config={k: str(v) for k, v in run.config.to_dict().items()},
            init_kwargs=init_kwargs(run.trackers, run.output_dir),
        )
    if run.config.progress and run.main:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=run.config.max_steps, initial=run.step, desc=run.desc, dynamic_ncols=True)
    run.t0 = time.perf_counter()


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


def _log(run: _Run, entry: dict[str, float]) -> None:
    run.history.append(entry)
    if run.trackers:
        run.accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=int(entry["step"]))
    if run.main and run.output_dir is not None:
        with open(run.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")


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
        from ..trackers import finish

        finish(run.accelerator)


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
