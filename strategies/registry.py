"""The strategy registry: plugins found under the entry-point group ``florist.strategies``."""

from __future__ import annotations

import logging
import threading
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points

from .base import StrategyPlugin

ENTRY_POINT_GROUP = "florist.strategies"

log = logging.getLogger(__name__)


class StrategyRegistryError(Exception):
    """Base of the registry's errors."""


class UnknownStrategyError(StrategyRegistryError, KeyError):
    """No plugin of that name; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class DuplicateStrategyError(StrategyRegistryError):
    """Two plugins claim the same name."""


class PluginLoadError(StrategyRegistryError):
    """A plugin's entry point failed to import or does not hold a StrategyPlugin."""


class StrategyRegistry:
    """Plugins by name, read from entry points once and imported lazily on first use.

    Built-in strategies register through the same entry points a third party uses, so
    ``florist`` itself has no special path.
    """

    def __init__(self, group: str = ENTRY_POINT_GROUP) -> None:
        self._group = group
        self._lock = threading.Lock()
        self._entry_points: dict[str, EntryPoint] | None = None
        self._loaded: dict[str, StrategyPlugin] = {}

    def _discover(self) -> dict[str, EntryPoint]:
        with self._lock:
            if self._entry_points is None:
                found: dict[str, EntryPoint] = {}
                for ep in entry_points(group=self._group):
                    other = found.get(ep.name)
                    # An editable install can list one distribution twice: same value, no clash.
                    if other is not None and other.value != ep.value:
                        raise DuplicateStrategyError(
                            f"strategy {ep.name!r} is registered twice: "
                            f"{other.value!r} and {ep.value!r}"
                        )
                    found[ep.name] = ep
                self._entry_points = found
            return self._entry_points

    def names(self) -> list[str]:
        """Every registered name, sorted, without importing any plugin."""
        return sorted(set(self._discover()) | set(self._loaded))

    def register(self, plugin: StrategyPlugin) -> None:
        """Add a plugin in-process (tests, notebooks); a name already taken is refused."""
        if plugin.name in self.names():
            raise DuplicateStrategyError(f"strategy {plugin.name!r} is already registered")
        self._loaded[plugin.name] = plugin

    def get(self, name: str) -> StrategyPlugin:
        """The plugin called ``name``; raises UnknownStrategyError listing the known names."""
        if name in self._loaded:
            return self._loaded[name]
        eps = self._discover()
        if name not in eps:
            known = ", ".join(self.names()) or "none"
            raise UnknownStrategyError(f"unknown strategy {name!r}; known strategies: {known}")
        ep = eps[name]
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginLoadError(
                f"strategy plugin {name!r} ({ep.value}) failed to load: {exc!r}"
            ) from exc
        if not isinstance(plugin, StrategyPlugin):
            raise PluginLoadError(
                f"strategy plugin {name!r} ({ep.value}) is a {type(plugin).__name__}, "
                "not a StrategyPlugin"
            )
        if plugin.name != name:
            raise PluginLoadError(
                f"entry point {name!r} ({ep.value}) holds a plugin named {plugin.name!r}"
            )
        self._loaded[name] = plugin
        return plugin

    def load_all(self) -> tuple[list[StrategyPlugin], dict[str, str]]:
        """Every plugin that loads, and an error message per plugin that does not.

        A broken third-party plugin is reported by name, not allowed to take the host down.
        """
        plugins: list[StrategyPlugin] = []
        errors: dict[str, str] = {}
        for name in self.names():
            try:
                plugins.append(self.get(name))
            except PluginLoadError as exc:
                log.warning("%s", exc)
                errors[name] = str(exc)
        return plugins, errors


@lru_cache(maxsize=1)
def default_registry() -> StrategyRegistry:
    """The process-wide registry over the installed entry points."""
    return StrategyRegistry()
