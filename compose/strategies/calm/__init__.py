"""CALM: composition of a frozen anchor with frozen augmenting models (Bansal et al., arXiv 2401.02412).

Both the anchor ``m_B`` and every augmenting model ``m_A`` stay frozen. For each connection
``(augment_layer i, anchor_layer j)`` a small trainable module projects ``m_A``'s layer-``i``
output to ``m_B``'s width, cross-attends to it from ``m_B``'s layer-``j`` output, and adds the
result to ``m_B``'s residual stream (or, for the anchor layer ``"input"``, to the input of
``m_B``'s first block). The output projection starts at zero: the composition equals the
anchor until trained. Anchor position ``t`` sees augmenting positions ``<= t`` only, never a
padded one.

The package, one concept per module:

* :mod:`.options`: :class:`CalmOptions` (what ``Composer(..., strategy="calm", **options)``
  takes) and :func:`plan_connections`;
* :mod:`.layers`: :class:`CrossConnection` and the visibility functions;
* :mod:`.cache`: :class:`CalmCache`, the composite ``transformers.Cache``;
* :mod:`.configuration`: :class:`CalmConfig` (``model_type="compose_calm"``) and the base
  model fingerprints;
* :mod:`.modeling`: :class:`CalmForCausalLM` (``PreTrainedModel`` + ``GenerationMixin``);
* :mod:`.serialization`: ``save_pretrained`` / ``from_pretrained``;
* :mod:`.strategy`: the registered ``calm`` strategy.

Importing this package registers :class:`CalmConfig` and :class:`CalmForCausalLM` with
``AutoConfig`` and ``AutoModelForCausalLM``.

>>> import torch
>>> from compose import Composer
>>> from compose.testing import tiny_model
>>> c = Composer(tiny_model("llama", hidden=48, heads=6), tiny_model("gpt2", seed=1), strategy="calm", every=2)
>>> anchor_logits = c.model.anchor(torch.tensor([[5, 6, 7]])).logits
>>> torch.equal(c.model(torch.tensor([[5, 6, 7]])).logits, anchor_logits)
True
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .cache import CalmCache
from .configuration import CALM_FORMAT_VERSION, CalmConfig, fingerprint
from .layers import CrossConnection, StopForward, anchor_input_rms, causal_visibility, windowed_visibility
from .modeling import CalmForCausalLM
from .options import INPUT, CalmOptions, check_same_vocabulary, plan_connections
from .serialization import WEIGHTS_NAME
from .strategy import Calm

#: The name of the composed model before it became a ``PreTrainedModel``.
CalmModel = CalmForCausalLM

__all__ = [
    "Calm",
    "CalmOptions",
    "CalmConfig",
    "CalmForCausalLM",
    "CalmModel",
    "CalmCache",
    "CrossConnection",
    "StopForward",
    "anchor_input_rms",
    "causal_visibility",
    "windowed_visibility",
    "plan_connections",
    "check_same_vocabulary",
    "fingerprint",
    "CALM_FORMAT_VERSION",
    "WEIGHTS_NAME",
    "INPUT",
]


def _register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` resolve ``model_type="compose_calm"`` (idempotent)."""
    try:
        AutoConfig.register(CalmConfig.model_type, CalmConfig)
    except ValueError:  # already registered (a re-import)
        pass
    try:
        AutoModelForCausalLM.register(CalmConfig, CalmForCausalLM)
    except ValueError:
        pass


_register_auto_classes()
