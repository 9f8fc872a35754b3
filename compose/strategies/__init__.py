"""Strategies: one module each, registered by name in :data:`STRATEGIES`."""

from .base import (
    STRATEGIES,
    Pretrained,
    Strategy,
    StrategyConfig,
    get_strategy,
    make_config,
    register,
    strategy_of,
    strategy_table,
    unregister,
)
from .block_expand import BlockExpand, BlockExpandConfig
from .calm import Calm, CalmConfig, CalmForCausalLM, CalmModel, CalmOptions
from .full import Full, FullConfig
from .lora import Lora, LoraConfig, merge_and_export

__all__ = [
    "STRATEGIES",
    "Strategy",
    "StrategyConfig",
    "get_strategy",
    "make_config",
    "register",
    "unregister",
    "strategy_of",
    "strategy_table",
    "Pretrained",
    "BlockExpand",
    "BlockExpandConfig",
    "Calm",
    "CalmConfig",
    "CalmModel",
    "CalmForCausalLM",
    "CalmOptions",
    "Full",
    "FullConfig",
    "Lora",
    "LoraConfig",
    "merge_and_export",
]
