"""The `florist` command's argument checks, before it starts anything."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from florist.server import cli


@pytest.mark.parametrize(
    ("node_config", "named"),
    [
        ('availability-trace="120-0/600"', "availability-trace"),
        ('seconds-per-step="fast"', "seconds-per-step"),
        ("k==1", "--node-config"),
        ("dropout=[1]", "dropout"),
        ('profile="warp"', "profile"),
        ('availability=0.5 availability-trace="0-1/2"', "availability-trace"),
        ("not toml =", "--node-config"),
    ],
)
def test_client_refuses_a_bad_node_config_naming_the_key(
    node_config: str, named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Execute: nothing may start, so a supervisor that got this far is a failure.
    monkeypatch.setattr(cli, "Supervisor", None)
    result = CliRunner().invoke(
        cli.app,
        ["client", "--partition-id", "0", "--num-partitions", "2", "--node-config", node_config],
    )

    # Assert
    assert result.exit_code == 2, result.output
    assert named in result.output
