"""Strategy plugins: the registry, the plugin contract, and one module per algorithm."""

from .base import EmptyConfig, ServerSetup, StrategyConfig, StrategyPlugin
from .registry import (
    ENTRY_POINT_GROUP,
    DuplicateStrategyError,
    PluginLoadError,
    StrategyRegistry,
    UnknownStrategyError,
    default_registry,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "DuplicateStrategyError",
    "EmptyConfig",
    "PluginLoadError",
    "ServerSetup",
    "StrategyConfig",
    "StrategyPlugin",
    "StrategyRegistry",
    "UnknownStrategyError",
    "default_registry",
]
