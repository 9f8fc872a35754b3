"""DeepSpeed ZeRO state in compose's checkpoint format: the full trainable tensors (fp32 masters)
and their optimizer state, gathered from ZeRO's partitions and put back into them.

Only DeepSpeed's public pieces are used: ``safe_get_full_*`` / ``safe_set_full_*`` for the values,
the optimizer's ``state`` / ``param_groups`` / ``state_dict()`` for the flat fp32 buffers its torch
optimizer steps, and ``lazy_init_hp_params_optimizer_state`` to link ZeRO-1/2 parameters to their
slices of the optimizer state. Checked with DeepSpeed 0.19.
"""

from __future__ import annotations

from typing import Any

import torch

from .run import _Run


def _flat_buffers(run: _Run) -> list[torch.Tensor]:
    """The flat fp32 buffers that ZeRO's torch optimizer steps and keys its state by: one per group in
    ZeRO-1/2 (the group's only parameter), one per sub-group in ZeRO-3 (whose groups are emptied
    between steps; its ``state_dict`` lists the buffers themselves)."""
    if run.zero == 3:
        from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS

        return list(run.optimizer.state_dict()[FP32_FLAT_GROUPS])
    return [flat for group in run.optimizer.param_groups for flat in group["params"]]


def _zero_link_state(run: _Run) -> None:
    """ZeRO-1/2 link each parameter to its slice of the optimizer state once, right after the first
    group's first update, so groups updated after it stay unlinked; link every group now that all exist.
    (ZeRO-3 reads the state through its buffers and needs no link.)"""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    if run.zero == 3:
        return
    for params, flat in zip(run.trainable_groups, _flat_buffers(run)):
        lazy_init_hp_params_optimizer_state(params, flat, run.optimizer.state)


def _deepspeed_gather(run: _Run) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable tensors (fp32 masters) and their optimizer state, in full and keyed by parameter
    name, assembled from ZeRO's partitions (a collective: every process calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    names: dict[int, list[str]] = {}
    for n, p in run.model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    first = next(iter(run.optimizer.state.values()), {})  # empty until a first update; alike for every buffer
    keys = [k for k, v in first.items() if torch.is_tensor(v) and v.ndim > 0]
    scalars = {k: v for k, v in first.items() if k not in keys}
    if keys:
        _zero_link_state(run)
    model, state = {}, {}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in run.optimizer.param_groups]
    for index, params in enumerate(run.trainable_groups):
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
        for flat in _flat_buffers(run):  # AdamW creates its state lazily: lay it out first, then fill it
            run.optimizer.state[flat] = {k: v.clone() if torch.is_tensor(v) else v for k, v in sample.items()}
            run.optimizer.state[flat].update({k: torch.zeros_like(flat) for k in keys})
        _zero_link_state(run)
        for n, p in params:
            for k in keys:
                safe_set_full_optimizer_state(p, optim["state"][n][k].to(device), k)
    for group, saved in zip(run.optimizer.param_groups, optim["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})
