"""Checkpoints: the file format, and the state of a run written into it and read back.

A checkpoint (``output_dir/checkpoints/step-N``) is the same for every distributed type (one
process, DDP, FSDP2, DeepSpeed ZeRO): the full state of the *trainable* tensors, the optimizer
state keyed by parameter name (safetensors + JSON), the scheduler, the RNG, the data position,
and last a ``manifest.json`` with the sha256 of every file. Nothing is unpickled on resume.
FSDP2 state is gathered and re-sharded with ``torch.distributed.checkpoint.state_dict``; ZeRO
state in :mod:`compose.train.zero`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_directory, read_json, write_json
from ..resume import check_fingerprints, check_resume_settings
from .config import TrainConfig
from .run import _any_rank, _Run
from .zero import _deepspeed_gather, _deepspeed_load

CHECKPOINT_DIR = "checkpoints"


MANIFEST = "manifest.json"


_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete or damaged (names the file)."""


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
