"""The strategy registry: plugins found under the entry-point group ``florist.strategies``."""

from __future__ import annotations

from functools import lru_cache

from florist.client.plugins import (
    DuplicatePluginError,
    PluginLoadError,
    PluginRegistry,
    PluginRegistryError,
    UnknownPluginError,
)

from .base import StrategyPlugin

ENTRY_POINT_GROUP = "florist.strategies"

StrategyRegistryError = PluginRegistryError

__all__ = [
    "ENTRY_POINT_GROUP",
    "DuplicateStrategyError",
    "PluginLoadError",
    "StrategyRegistry",
    "StrategyRegistryError",
    "UnknownStrategyError",
    "default_registry",
]


class UnknownStrategyError(UnknownPluginError):
    """No strategy of that name; the message lists the known ones."""


class DuplicateStrategyError(DuplicatePluginError):
    """Two strategy plugins claim the same name."""


class StrategyRegistry(PluginRegistry[StrategyPlugin]):
    """Strategy plugins by name (see :class:`~florist.client.plugins.PluginRegistry`)."""

    kind = "strategy"
    unknown_error = UnknownStrategyError
    duplicate_error = DuplicateStrategyError

    def __init__(self, group: str = ENTRY_POINT_GROUP) -> None:
        super().__init__(group, StrategyPlugin)


@lru_cache(maxsize=1)
def default_registry() -> StrategyRegistry:
    """The process-wide registry over the installed entry points."""
    return StrategyRegistry()
