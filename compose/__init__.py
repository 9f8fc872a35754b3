"""compose: teach a pretrained LLM new skills without breaking the old ones.

Augment a frozen anchor model with block expansion (LLaMA Pro) or CALM composition.

Importing ``compose`` registers the CALM composition (``model_type="compose_calm"``) with
transformers' ``AutoConfig`` and ``AutoModelForCausalLM``, so a saved composition loads with
``AutoModelForCausalLM.from_pretrained(directory)``.
"""

from .composer import Composer, load_model  # noqa: E402
from .recipe import check_recipe, load_recipe, run_recipe  # noqa: E402
from .strategies import STRATEGIES, Strategy, StrategyConfig, register  # noqa: E402
from .strategies.calm import CalmConfig, CalmForCausalLM  # noqa: E402 - registers the Auto classes
from .version import __version__

__all__ = [
    "Composer",
    "load_model",
    "STRATEGIES",
    "Strategy",
    "StrategyConfig",
    "register",
    "CalmConfig",
    "CalmForCausalLM",
    "load_recipe",
    "check_recipe",
    "run_recipe",
    "__version__",
]
