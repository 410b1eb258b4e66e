"""A registry of named plugins read from one entry-point group, imported lazily on first use."""

from __future__ import annotations

import logging
import threading
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)


class Named(Protocol):
    @property
    def name(self) -> str: ...


P = TypeVar("P", bound=Named)


class PluginRegistryError(Exception):
    """Base of the registries' errors."""


class UnknownPluginError(PluginRegistryError, KeyError):
    """No plugin of that name; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class DuplicatePluginError(PluginRegistryError):
    """Two plugins claim the same name."""


class PluginLoadError(PluginRegistryError):
    """A plugin's entry point failed to import or does not hold a plugin of the right type."""


class PluginRegistry(Generic[P]):
    """Plugins of one kind by name, read from entry points once and imported lazily.

    Built-ins register through the same entry points a third party uses, so ``florist`` itself
    has no special path. Subclasses name the kind (``strategy``, ``workload``), the plugin type
    and, if they like, their own error subclasses.
    """

    kind = "plugin"
    unknown_error: type[UnknownPluginError] = UnknownPluginError
    duplicate_error: type[DuplicatePluginError] = DuplicatePluginError

    def __init__(self, group: str, plugin_type: type[P]) -> None:
        self._group = group
        self._type = plugin_type
        self._lock = threading.Lock()
        self._entry_points: dict[str, EntryPoint] | None = None
        self._loaded: dict[str, P] = {}

    def _discover(self) -> dict[str, EntryPoint]:
        with self._lock:
            if self._entry_points is None:
                found: dict[str, EntryPoint] = {}
                for ep in entry_points(group=self._group):
                    other = found.get(ep.name)
                    # An editable install can list one distribution twice: same value, no clash.
                    if other is not None and other.value != ep.value:
                        raise self.duplicate_error(
                            f"{self.kind} {ep.name!r} is registered twice: "
                            f"{other.value!r} and {ep.value!r}"
                        )
                    found[ep.name] = ep
                self._entry_points = found
            return self._entry_points

    def names(self) -> list[str]:
        """Every registered name, sorted, without importing any plugin."""
        return sorted(set(self._discover()) | set(self._loaded))

    def register(self, plugin: P) -> None:
        """Add a plugin in-process (tests, notebooks); a name already taken is refused."""
        if plugin.name in self.names():
            raise self.duplicate_error(f"{self.kind} {plugin.name!r} is already registered")
        self._loaded[plugin.name] = plugin

    def get(self, name: str) -> P:
        """The plugin called ``name``; raises an UnknownPluginError listing the known names."""
        if name in self._loaded:
            return self._loaded[name]
        eps = self._discover()
        if name not in eps:
            known = ", ".join(self.names()) or "none"
            raise self.unknown_error(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}")
        ep = eps[name]
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginLoadError(
                f"{self.kind} plugin {name!r} ({ep.value}) failed to load: {exc!r}"
            ) from exc
        if not isinstance(plugin, self._type):
            raise PluginLoadError(
                f"{self.kind} plugin {name!r} ({ep.value}) is a {type(plugin).__name__}, "
                f"not a {self._type.__name__}"
            )
        if plugin.name != name:
            raise PluginLoadError(
                f"entry point {name!r} ({ep.value}) holds a plugin named {plugin.name!r}"
            )
        self._loaded[name] = plugin
        return plugin

    def load_all(self) -> tuple[list[P], dict[str, str]]:
        """Every plugin that loads, and an error message per plugin that does not.

        A broken third-party plugin is reported by name, not allowed to take the host down.
        """
        plugins: list[P] = []
        errors: dict[str, str] = {}
        for name in self.names():
            try:
                plugins.append(self.get(name))
            except PluginLoadError as exc:
                log.warning("%s", exc)
                errors[name] = str(exc)
        return plugins, errors
