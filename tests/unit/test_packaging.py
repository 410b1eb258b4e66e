"""The built wheel holds every file the server reads at run time (deploy/ runs `pip install .`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

pytestmark = pytest.mark.slow


def dockerfile_copies() -> list[str]:
    """The paths deploy/Dockerfile copies into the image before `pip install .`."""
    sources: list[str] = []
    for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words and words[0] == "COPY" and not any(w.startswith("--") for w in words):
            sources.extend(words[1:-1])
    return sources


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    # Build from a copy holding only what the image holds: an in-tree build would leave build/
    # in the checkout, and a stale build/lib could supply files the package-data no longer names.
    src = tmp_path_factory.mktemp("src")
    for name in dockerfile_copies():
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip_wheel, "--no-index", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("florist-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_the_image_copies_every_package_folder() -> None:
    assert {"pyproject.toml", "server", "client", "strategies", "datasets"} <= set(
        dockerfile_copies()
    )


def test_wheel_ships_every_dashboard_file(wheel_names: set[str]) -> None:
    static = ROOT / "server" / "dashboard" / "static"
    expected = {
        f"florist/server/dashboard/static/{p.relative_to(static).as_posix()}"
        for p in static.rglob("*")
        if p.is_file()
    }
    assert "florist/server/dashboard/static/pages/experiment.js" in expected
    assert sorted(expected - wheel_names) == []


def test_wheel_ships_the_other_runtime_files(wheel_names: set[str]) -> None:
    versions = ROOT / "server" / "db" / "migrations" / "versions"
    expected = {
        "florist/server/flwr_app/pyproject.toml",
        "florist/server/db/migrations/script.py.mako",
        "florist/server/db/migrations/env.py",
    } | {f"florist/server/db/migrations/versions/{p.name}" for p in versions.glob("*.py")}
    assert sorted(expected - wheel_names) == []
