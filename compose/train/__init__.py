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

The pieces, each a module:

- :mod:`~compose.train.config`: :class:`TrainConfig`, :class:`TrainResult`, the schedule;
- :mod:`~compose.train.batches`: the data order (a pure function of seed and step) and the data building;
- :mod:`~compose.train.loss`: the model's loss or :class:`ChunkedLoss`;
- :mod:`~compose.train.checkpoint`: the checkpoint format (one for every distributed type) and resume;
- :mod:`~compose.train.distributed`: the accelerator, FSDP2 and DeepSpeed adaptations;
- :mod:`~compose.train.zero`: DeepSpeed ZeRO state in and out of the checkpoint format;
- :mod:`~compose.train.run`: what a run holds between the pieces;
- :mod:`~compose.train.loop`: :func:`train` itself, read top to bottom.
"""

from .checkpoint import CheckpointError, latest_checkpoint, verify_checkpoint
from .config import TrainConfig, TrainResult, make_scheduler
from .loop import train
from .loss import ChunkedLoss

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "latest_checkpoint",
    "verify_checkpoint",
    "CheckpointError",
    "make_scheduler",
    "ChunkedLoss",
]
