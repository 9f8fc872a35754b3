"""Training behaviour of a composition: only the connections train, the frozen bases stay in eval mode.

:class:`FrozenBasesMixin` gives :class:`~compose.strategies.calm.CalmForCausalLM` its
``train()`` (dropout stays off in the frozen models) and gradient checkpointing of the anchor's
blocks with the connection hooks kept outside the recomputation.
"""

from __future__ import annotations

from typing import Any

from ... import arch

__all__ = ["FrozenBasesMixin"]


class FrozenBasesMixin:
    """``train`` / gradient checkpointing for a module with ``anchor``, ``augments`` and ``connections``."""

    _gradient_checkpointing = False

    def train(self, mode: bool = True) -> FrozenBasesMixin:
        """Train mode for the connections only; the frozen models stay in eval mode (no dropout).

        With gradient checkpointing on, the anchor's decoder blocks themselves (not their
        sub-modules, so dropout stays off) get ``training=mode``, because transformers only
        checkpoints a block in training mode.
        """
        self.training = mode
        self.connections.train(mode)
        for model in [self.anchor, *self.augments]:
            model.eval()
        self.augments.training = False
        if self._gradient_checkpointing:
            for block in arch.get_blocks(self.anchor):
                block.training = mode
        return self

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Checkpoint the anchor's blocks (non-reentrant by default).

        The connection hooks sit outside the checkpointed ``forward`` (transformers >= 5
        checkpoints ``forward``, not ``__call__``), so the recomputation does not re-run them;
        the augmenting models run without grad and need no checkpointing.
        """
        block = arch.get_blocks(self.anchor)[0]
        if not hasattr(type(block).forward, "__wrapped__"):
            raise RuntimeError(
                f"{type(block).__name__} does not checkpoint its forward (transformers too old?); "
                "CALM gradient checkpointing needs transformers >= 5"
            )
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if hasattr(self.anchor, "activation_checkpointing_enable"):
            self.anchor.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.anchor.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self._gradient_checkpointing = True
        self.train(self.training)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **_: Any) -> None:
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        if hasattr(self.anchor, "activation_checkpointing_disable"):
            self.anchor.activation_checkpointing_disable()
        else:
            self.anchor.gradient_checkpointing_disable()
        self._gradient_checkpointing = False
        self.train(self.training)

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._gradient_checkpointing
