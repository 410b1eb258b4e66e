"""Static checks of deploy/: no Docker engine here, so the files are checked against the code."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from florist.server.cli import app
from florist.server.settings import Settings

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def florist_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if s.get("image") == "florist:latest"}


def test_every_service_command_is_a_real_cli_invocation(compose: dict[str, Any]) -> None:
    runner = CliRunner()
    services = florist_services(compose)
    assert {"server", "client-0", "client-1", "client-2"} <= set(services)
    for name, service in services.items():
        argv = service["command"]
        help_text = runner.invoke(app, [argv[0], "--help"], terminal_width=200).output
        assert "Usage" in help_text, f"{name}: florist has no command {argv[0]!r}"
        for option in (a for a in argv[1:] if a.startswith("--")):
            assert option in help_text, f"{name}: `florist {argv[0]}` has no option {option}"


def test_clients_cover_every_partition_once(compose: dict[str, Any]) -> None:
    parts = []
    for name, service in florist_services(compose).items():
        if service["command"][0] != "client":
            continue
        args = dict(zip(service["command"][1::2], service["command"][2::2], strict=True))
        assert args["--superlink"] == "server:9092", name
        parts.append((int(args["--partition-id"]), int(args["--num-partitions"])))
    assert sorted(p for p, _ in parts) == list(range(len(parts)))
    assert {n for _, n in parts} == {len(parts)}


def test_environment_names_real_settings(compose: dict[str, Any]) -> None:
    fields = {f"FLORIST_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose["services"].items():
        for key in service.get("environment", {}):
            if key.startswith("FLORIST_"):
                assert key in fields, f"{name}: {key} is not a setting ({sorted(fields)})"
    server = compose["services"]["server"]["environment"]
    settings = Settings(**{k[len("FLORIST_") :].lower(): v for k, v in server.items()})
    assert settings.resolved_database_url().startswith("postgresql://")
    published = {p.split(":")[1] for p in compose["services"]["server"]["ports"]}
    assert published == {str(settings.api_port), settings.superlink_fleet.rsplit(":", 1)[1]}


def test_dockerfile_copies_what_exists_and_exposes_the_published_ports(
    compose: dict[str, Any],
) -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for src in shlex.split(line)[1:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} is missing"
    exposed = set(re.findall(r"^EXPOSE (.+)$", dockerfile, re.M)[0].split())
    published = {p.split(":")[1] for p in compose["services"]["server"]["ports"]}
    assert exposed == published
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert 'ENTRYPOINT ["florist"]' in dockerfile and "florist" in scripts
    assert 'pip install "torch==2.13.0"' in dockerfile
