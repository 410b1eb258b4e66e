"""The strategy registry: entry points, lazy loading, loud failures, third-party plugins."""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from pydantic import ValidationError

from florist.strategies import (
    DuplicateStrategyError,
    PluginLoadError,
    StrategyRegistry,
    UnknownStrategyError,
    default_registry,
)
from florist.strategies.base import ServerSetup
from florist.strategies.events import EventStrategy
from florist.strategies.flower_adapter import as_scheduler

FIXTURES = Path(__file__).parents[1] / "fixtures" / "thirdparty"


def test_builtins_are_registered_through_entry_points() -> None:
    names = StrategyRegistry().names()
    for name in ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "krum", "fedmedian"):
        assert name in names


def test_every_builtin_loads_and_builds_its_server_half() -> None:
    plugins, errors = StrategyRegistry().load_all()
    assert errors == {}
    setup = ServerSetup(num_rounds=3, min_clients=3)
    for plugin in plugins:
        config = plugin.parse_config({})
        # Every server half runs on the one loop: a Florist scheduler or a Flower strategy.
        scheduler = as_scheduler(plugin.build_server(config, setup))
        assert isinstance(scheduler, EventStrategy), plugin.name
        assert plugin.config_schema()["type"] == "object"


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(UnknownStrategyError, match="fedavg") as info:
        StrategyRegistry().get("fedavgg")
    assert "unknown strategy 'fedavgg'" in str(info.value)


def test_bad_config_field_is_refused() -> None:
    plugin = StrategyRegistry().get("fedprox")
    with pytest.raises(ValidationError, match="proximal_mu"):
        plugin.parse_config({"proximal_mu": -1})
    with pytest.raises(ValidationError, match="extra"):
        plugin.parse_config({"proximal_muu": 0.1})


def _registry_with(monkeypatch: pytest.MonkeyPatch, eps: list[EntryPoint]) -> StrategyRegistry:
    def fake_entry_points(group: str) -> list[EntryPoint]:
        return eps if group == "test.group" else []

    monkeypatch.setattr("florist.client.plugins.entry_points", fake_entry_points)
    return StrategyRegistry("test.group")


def test_duplicate_names_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = [
        EntryPoint("dup", "florist.strategies.fedavg:plugin", "test.group"),
        EntryPoint("dup", "florist.strategies.fedprox:plugin", "test.group"),
    ]
    with pytest.raises(DuplicateStrategyError, match="registered twice"):
        _registry_with(monkeypatch, eps).names()


def test_broken_plugin_is_reported_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = [
        EntryPoint("fedavg", "florist.strategies.fedavg:plugin", "test.group"),
        EntryPoint("broken", "no_such_module_anywhere:plugin", "test.group"),
        EntryPoint("notaplugin", "florist.strategies.fedavg:build_server", "test.group"),
    ]
    registry = _registry_with(monkeypatch, eps)
    plugins, errors = registry.load_all()
    assert [p.name for p in plugins] == ["fedavg"]
    assert set(errors) == {"broken", "notaplugin"}
    assert "no_such_module_anywhere:plugin" in errors["broken"]
    with pytest.raises(PluginLoadError, match="not a StrategyPlugin"):
        registry.get("notaplugin")


def test_register_refuses_a_taken_name() -> None:
    registry = StrategyRegistry()
    with pytest.raises(DuplicateStrategyError):
        registry.register(registry.get("fedavg"))


def test_third_party_plugin_registers_by_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    # A distribution installed outside florist: its dist-info declares the entry point.
    monkeypatch.syspath_prepend(str(FIXTURES))
    registry = StrategyRegistry()
    assert "fedavg_marked" in registry.names()
    plugin = registry.get("fedavg_marked")
    assert plugin.parse_config({}).model_dump() == {"marker": 1.0}
    assert "florist_thirdparty_plugin" in sys.modules


def test_default_registry_is_shared() -> None:
    assert default_registry() is default_registry()
