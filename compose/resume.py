"""What may change when a run is resumed, and fingerprints of the model and data a checkpoint belongs to.

The rule (docs/reliability.md, "Resuming"):

* settings that shaped the optimizer state, the schedule or the data order of the checkpoint
  (:data:`FIXED`) must stay as they were: a change is refused, naming each changed setting
  with both values;
* ``max_steps`` may grow: training continues to the new count, and the learning-rate
  schedule (warmup and decay) is recomputed for it from the checkpoint's step on (a
  warning says so); it may not fall to or below the checkpoint's step;
* every other setting (logging, evaluation, checkpointing, clipping, speed) takes its new
  value.

A checkpoint also records a fingerprint of the model it was trained on (a sample of every
frozen tensor, or of every tensor when all of them train) and of the prepared training
data (a sample of the packed blocks); resuming with another anchor or another dataset is
refused, naming both.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["FIXED", "GROWS", "check_resume_settings", "model_fingerprint", "data_fingerprint", "check_fingerprints"]

FIXED = (
    "learning_rate",
    "weight_decay",
    "adam_betas",
    "adam_eps",
    "lr_scheduler",
    "warmup_ratio",
    "min_lr_ratio",
    "batch_size",
    "gradient_accumulation_steps",
    "seq_len",
    "seed",
    "packing",
    "mask_prompt",
    "text_field",
    "reset_position_ids",
    "streaming",
)
"""Settings baked into a checkpoint's optimizer state, schedule or data order: a resumed run keeps them."""
GROWS = ("max_steps",)
"""Settings that may grow on resume."""
_SAMPLE = 256


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def check_resume_settings(path: Path, state: dict[str, Any], config: Any, world: int) -> None:
    """Refuse a resume whose fixed settings differ from the checkpoint's; allow (and announce) more steps."""
    saved = state.get("config", {})
    changed = [
        f"{k} ({_plain(saved[k])!r} -> {_plain(getattr(config, k))!r})"
        for k in FIXED
        if k in saved and _plain(saved[k]) != _plain(getattr(config, k))
    ]
    if state.get("world_size", 1) != world:
        changed.append(f"number of processes ({state.get('world_size')} -> {world})")
    step = int(state.get("step", 0))
    if changed:
        raise ValueError(
            f"cannot resume from {path}: these settings differ from the interrupted run: {', '.join(changed)}. "
            "They are part of the checkpoint's optimizer state, schedule or data order: resume with the "
            "checkpoint's values, or start over with overwrite_output_dir=True (or a new output_dir)"
        )
    if config.max_steps <= step and saved.get("max_steps") != config.max_steps:
        raise ValueError(
            f"cannot resume from {path} with max_steps={config.max_steps}: that checkpoint is already at step {step}; "
            f"give max_steps above {step} to train further"
        )
    old = saved.get("max_steps")
    if old is not None and old != config.max_steps:
        warnings.warn(
            f"compose: resuming from step {step} with max_steps {old} -> {config.max_steps}: the learning-rate "
            f"schedule (warmup and decay) is recomputed for {config.max_steps} steps and followed from step {step}",
            stacklevel=4,
        )


def _tensor_sample(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    if flat.numel() > _SAMPLE:
        # integer steps: float32 linspace rounds n - 1 up to n past 2**24 elements (a 49k x 576 embedding)
        idx = torch.arange(_SAMPLE, dtype=torch.int64, device=flat.device) * (flat.numel() - 1) // (_SAMPLE - 1)
        flat = flat[idx]
    # rounded to bf16: the same weights loaded in fp32, bf16 or fp16 give (nearly always) the same print
    return flat.to("cpu", torch.float32).to(torch.bfloat16).float().numpy().tobytes()


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """A sample of every frozen tensor (of every tensor when all train), hashed; and the model's name."""
    params = list(model.named_parameters())
    frozen = [(n, p) for n, p in params if not p.requires_grad]
    h = hashlib.sha256()
    for name, p in frozen or params:
        if p.is_meta:
            continue
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(_tensor_sample(p))
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or type(model).__name__
    return {"model": h.hexdigest()[:16], "model_name": str(name)}


def describe_data(data: Any) -> str:
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    try:
        return f"a {type(data).__name__} of {len(data)} records"
    except TypeError:
        return f"a {type(data).__name__}"


def data_fingerprint(blocks: Any, data: Any) -> dict[str, str]:
    """A sample of the packed training blocks (their count, token total and a spread of rows), hashed."""
    n = len(blocks)
    h = hashlib.sha256(f"{n}:{blocks.num_tokens}".encode())
    rows = sorted({round(i * (n - 1) / 15) for i in range(16)}) if n else []
    for ids in blocks.dataset.with_format(None)[rows]["input_ids"] if rows else []:
        h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return {"data": h.hexdigest()[:16], "data_name": describe_data(data)}


def check_fingerprints(path: Path, saved: dict[str, str], now: dict[str, str]) -> None:
    """Refuse a resume onto another model or dataset than the checkpoint's (older checkpoints carry none)."""
    differ = []
    for key, what in (("model", "model (anchor)"), ("data", "training data")):
        if key in saved and key in now and saved[key] != now[key]:
            differ.append(
                f"another {what}: the checkpoint was trained on {saved.get(key + '_name')!r} "
                f"(fingerprint {saved[key]}), this run has {now.get(key + '_name')!r} (fingerprint {now[key]})"
            )
    if differ:
        raise ValueError(
            f"cannot resume from {path}: this run has {'; and '.join(differ)}. Resume with the checkpoint's model "
            "and data, or start over with overwrite_output_dir=True (or a new output_dir)"
        )
