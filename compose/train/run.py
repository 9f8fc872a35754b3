"""What one training run holds between its pieces, and the agreement of its processes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import TokenBlocks
from .config import TrainConfig


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
    trainable_groups: list[list[nn.Parameter]] = field(default_factory=list)
    """The trainable parameters of each optimizer group, as handed to the optimizer (ZeRO flattens each
    group into buffers of its own; compose's checkpoints name the parameters)."""
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


def _any_rank(run: _Run, flag: bool) -> bool:
    if run.world == 1:
        return flag
    t = run.accelerator.reduce(torch.tensor([float(flag)], device=run.accelerator.device), reduction="sum")
    return bool(t.item() > 0)
