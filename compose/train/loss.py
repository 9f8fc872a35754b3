"""The next-token loss: the model's own, or :class:`ChunkedLoss` that never holds the full logits."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from .. import arch, packing
from ..data import IGNORE


def _model_inputs(batch: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Forward inputs; with per-document ``position_ids`` attention stays inside each document."""
    return packing.model_inputs(batch, model)


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
            hidden = wrapped(**_model_inputs(batch, wrapped)).logits
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
