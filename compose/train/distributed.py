"""The accelerator of a run and compose's adaptations of FSDP2 and DeepSpeed.

accelerate enters FSDP and DeepSpeed only from its GPU launch modes; on a machine without GPUs
compose switches such a launch to them over gloo. DeepSpeed's config is filled from ``fit``'s
options, and the full weights of a sharded model are gathered for the final save.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .run import _Run

_DEEPSPEED_PLUGIN = "compose"


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
    from ..trackers import resolve_trackers

    return resolve_trackers(config.report_to, config.output_dir)


def _make_accelerator(config: TrainConfig, output_dir: Path | None):
    """An ``Accelerator`` for this run; a previous run's different ``mixed_precision`` is reset first."""
    from accelerate import Accelerator

    precision = _resolve_mixed_precision(config.mixed_precision)
    previous = _held_precision()
    if previous is not None and previous != precision:
        _drop_precision()
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


def _held_precision() -> str | None:
    """The precision accelerate's process-wide state holds from an earlier run (``None``: no run yet).
    Under DeepSpeed it holds ``no`` and leaves the precision to the engine's config."""
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import DistributedType

    if not is_initialized():
        return None
    state = AcceleratorState()
    return "no" if state.distributed_type == DistributedType.DEEPSPEED else state.mixed_precision


def _drop_precision() -> None:
    """Drop accelerate's precision settings; the process group (``PartialState``) is kept.

    accelerate keeps one state per process and refuses an ``Accelerator`` with another
    ``mixed_precision``, and has no public way to drop that state (accelerate 1.1 to 1.16):
    this is its own reset, the one its tests use, and the only private accelerate name compose
    calls. It is tested at both ends of the supported range (``.ci/run``); an accelerate without
    it gets a clear error instead of a second run in the wrong precision.
    """
    import accelerate
    from accelerate.state import AcceleratorState

    reset = getattr(AcceleratorState, "_reset_state", None)
    if reset is None:
        raise RuntimeError(
            f"this process already trained with another mixed_precision and accelerate {accelerate.__version__} "
            "offers no way to change it within one process; run this fit in a new process "
            "(nothing was written)"
        )
    reset(reset_partial_state=False)


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
    from accelerate import PartialState
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
    # The process state says DEEPSPEED, as after a GPU DeepSpeed launch: accelerate re-reads it whenever
    # its state is built, and selects a plugin only in that mode. One named plugin is accelerate's own
    # form for several (the selected one is the active one).
    PartialState().distributed_type = DistributedType.DEEPSPEED
    accelerator.state.distributed_type = DistributedType.DEEPSPEED
    accelerator.state.deepspeed_plugins = {_DEEPSPEED_PLUGIN: plugin}
    accelerator.state.select_deepspeed_plugin(_DEEPSPEED_PLUGIN)


def _deepspeed_config(accelerator, config: TrainConfig) -> int:
    """Fill the DeepSpeed config from ``fit``'s options (compose's loop drives the engine); returns the ZeRO stage.

    A DeepSpeed config *file* may leave these entries ``auto`` or repeat fit's values; a different value
    is an error naming it. Without a file (launch flags, launch/zero*.yaml) fit's values are used.
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


def _fill_skeleton(skeleton: nn.Module, full: dict[str, torch.Tensor]) -> nn.Module:
    skeleton.load_state_dict(full, strict=False, assign=True)
    missing = [n for n, p in skeleton.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"the gathered FSDP state has no values for {missing[:5]}: cannot save the final model")
    if hasattr(skeleton, "tie_weights"):
        skeleton.tie_weights()
    return skeleton.eval()


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
