"""The `florist` command's argument checks, before it starts anything."""

from __future__ import annotations

from pathlib import Path

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


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ([], "--data-path"),  # no data at all
        (["--partition-id", "1"], "--partition-id"),  # half a partition
        (["--partition-id", "2", "--num-partitions", "2"], "--partition-id"),
        (["--data-path", "/nonexistent/site-3"], "--data-path"),
    ],
)
def test_client_needs_to_know_where_its_data_is(
    args: list[str], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "Supervisor", None)
    result = CliRunner().invoke(cli.app, ["client", *args])
    assert result.exit_code == 2, result.output
    assert named in result.output


def test_client_with_its_own_data_folder_starts_a_supernode_reading_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: capture the SuperNode the command would supervise instead of starting it.
    started: list[dict[str, object]] = []
    monkeypatch.setattr(
        cli,
        "_add_supernode",
        lambda sup, name, settings, node_config, *a: started.append(node_config),
    )
    monkeypatch.setattr(cli, "_supervise", lambda sup: None)

    # Execute
    result = CliRunner().invoke(cli.app, ["client", "--data-path", str(tmp_path)])

    # Assert: the node-config carries the folder, resolved, and no partition.
    assert result.exit_code == 0, result.output
    assert started == [{"data-path": str(tmp_path.resolve())}]


class _Recorded:
    """A Supervisor stand-in that keeps what it is given, starting nothing."""

    def __init__(self) -> None:
        self.managed: list[object] = []

    def add(self, managed: object) -> None:
        self.managed.append(managed)


@pytest.mark.parametrize(("on_host", "expected"), [(1, None), (4, "1")])
def test_up_shares_the_cores_among_one_executor_per_node(
    on_host: int, expected: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a two-core host, no operator setting.
    monkeypatch.delenv("FLORIST_EXECUTOR_THREADS", raising=False)
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    sup = _Recorded()
    settings = cli.Settings(home=tmp_path)

    # Execute
    cli._add_supernode(
        sup, "n0", settings, {"partition-id": 0}, 9100, tmp_path, True, executors_on_host=on_host
    )

    # Assert: the executor (the second process) gets its share; alone it keeps torch's default.
    _node, executor = sup.managed
    assert "florist.client.executor" in " ".join(executor.argv)  # type: ignore[attr-defined]
    assert executor.env.get("FLORIST_EXECUTOR_THREADS") == expected  # type: ignore[attr-defined]
