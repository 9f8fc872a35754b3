"""DeepSpeed ZeRO state in compose's checkpoint format: the full trainable tensors (fp32 masters)
and their optimizer state, gathered from ZeRO's partitions and put back into them, with
DeepSpeed's ``safe_get_full_*`` / ``safe_set_full_*``."""

from __future__ import annotations

from typing import Any

import torch

from .run import _Run


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
