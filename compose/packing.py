"""Packed blocks whose attention never crosses a document boundary, on every attention implementation.

With ``packing_attention="document"`` each block carries ``position_ids`` that restart at 0
at every document (and at the start of every block, where a long document continues), and
the model is called with those positions, no ``attention_mask`` and no cache. transformers
then keeps each token inside its document by itself:

* SDPA, eager and flex attention: its mask builder (``masking_utils``) finds the documents
  from the positions (a new one wherever a position is not the previous one + 1) and builds a
  block-diagonal causal mask (sliding windows and all);
* flash attention: it runs the variable-length kernel on the ``cu_seq_lens_*`` /
  ``max_length_*`` keyword arguments given here (transformers would infer them from the
  positions only for a batch of one row).

Padding sits at the end of a block, after every real token, and is never a label, so no
padding mask is needed. CALM adds the same rule to its cross-attention (an anchor token
reads only augmenting tokens of its own document), see
``compose.strategies.calm.modeling``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["document_ids", "varlen_kwargs", "uses_varlen", "model_inputs", "PACKING_ATTENTION"]

PACKING_ATTENTION = ("document", "block")


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` index of each token's document in its row: a new one where a position is not the last + 1.

    The same rule as transformers' ``find_packed_sequence_indices``, so the mask it builds and
    the cross-attention of a CALM composition agree.
    """
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def varlen_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """Flash attention's variable-length arguments for the documents of the flattened ``[B, T]`` batch."""
    flat = position_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = torch.diff(flat) != 1
    row = position_ids.shape[1]
    starts[::row] = True  # a row never continues the previous row's document
    cu = torch.cat([starts.nonzero().view(-1), torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _config(model: Any) -> Any:
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module  # DDP / DeepSpeed wrappers (a DeepSpeed engine's own .config is its JSON)
    return getattr(model, "config", None)


def uses_varlen(model: Any) -> bool:
    """Whether ``model`` attends with a flash-attention kernel (which takes documents as ``cu_seq_lens``)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    impl = str(getattr(_config(model), "_attn_implementation", None) or "")
    # a flash kernel (named so, or registered with flash's no-mask mask function)
    return "flash" in impl or (
        impl in ALL_MASK_ATTENTION_FUNCTIONS and ALL_MASK_ATTENTION_FUNCTIONS[impl] is flash_attention_mask
    )


def model_inputs(batch: dict[str, torch.Tensor], model: Any = None) -> dict[str, Any]:
    """Forward arguments of a batch: with ``position_ids``, attention stays inside each document."""
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    out: dict[str, Any] = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if model is not None and uses_varlen(model):
        out.update(varlen_kwargs(batch["position_ids"]))
    return out


# ---------------------------------------------------------------------------- for composite models (CALM)
def packed_documents(attention_mask: Any, cache: Any, position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Documents of a packed training batch (positions given, no mask, no cache), else ``None``."""
    if attention_mask is not None or cache is not None or position_ids is None or position_ids.shape[-1] < 2:
        return None
    return document_ids(position_ids)


def within_documents(visible: torch.Tensor, docs: torch.Tensor | None) -> torch.Tensor:
    """``visible [B, q, kv]`` limited to query and key of the same document (no cache: q == kv)."""
    if docs is None:
        return visible
    return visible & (docs[:, :, None] == docs[:, None, :])


def base_inputs(model: Any, attention_mask: Any, position_ids: Any, docs: torch.Tensor | None) -> dict[str, Any]:
    """A base model's mask and positions: inside packed documents (``docs``), no mask and, for flash, varlen."""
    if docs is None:
        return {"attention_mask": attention_mask, "position_ids": position_ids}
    out = {"attention_mask": None, "position_ids": position_ids}
    return {**out, **varlen_kwargs(position_ids)} if uses_varlen(model) else out
