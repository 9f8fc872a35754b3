"""Strategies: one module each, registered by name in :data:`STRATEGIES`."""

from .base import STRATEGIES, Strategy, StrategyConfig, get_strategy, make_config, register
from .block_expand import BlockExpand, BlockExpandConfig

__all__ = [
    "STRATEGIES",
    "Strategy",
    "StrategyConfig",
    "get_strategy",
    "make_config",
    "register",
    "BlockExpand",
    "BlockExpandConfig",
]
