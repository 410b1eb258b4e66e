"""benchmarks/report.py renders the README's results table from the results JSON files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.report import BEGIN, END, main, render

FIXTURE: dict[str, Any] = {
    "benchmark": "toy",
    "command": ".venv/bin/python benchmarks/toy.py",
    "grid": {"lr": [0.1, 0.3], "momentum": [0.0, 0.9]},
    "seeds": [0, 1, 2],
    "tail": 5,
    "runs_seconds": 125.0,
    "scenarios": {
        "full": {
            "methods": {
                "fedavg": {
                    "chosen": {"lr": 0.3, "momentum": 0.0},
                    "val": {"mean": 0.9412, "sd": 0.01},
                    "test": {"mean": 0.93456, "sd": 0.0123},
                    "metrics": {},
                },
                "fal": {
                    "chosen": {"lr": 0.1, "momentum": 0.9},
                    "val": {"mean": 0.9, "sd": 0.0},
                    "test": {"mean": 0.9, "sd": 0.02},
                    "metrics": {"robust-accuracy-strong": {"mean": 0.61, "sd": 0.04}},
                },
            }
        }
    },
}


def _write(tmp_path: Path) -> tuple[Path, Path]:
    results = tmp_path / "results"
    results.mkdir()
    (results / "toy.json").write_text(json.dumps(FIXTURE))
    (results / "untuned.json").write_text(json.dumps({"ratio": 0.05}))  # no scenarios: skipped
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# Benchmarks\n\nprose before\n\n{BEGIN}\nstale table\n{END}\n\nprose after\n"
    )
    return results, readme


def test_render_gives_one_row_per_method_with_the_chosen_setting_and_test_figures() -> None:
    table = render([FIXTURE])

    assert "| toy | full | fedavg | lr 0.3, momentum 0 | 0.941 | **0.935 ± 0.012** | – |" in table
    assert (
        "| toy | full | fal | lr 0.1, momentum 0.9 | 0.900 | **0.900 ± 0.020** | "
        "robust (strong) 0.610 ± 0.040 |" in table
    )
    assert "grid lr {0.1, 0.3} × client momentum {0, 0.9}" in table
    assert "seeds [0, 1, 2]" in table
    assert "(the runs took 2 min in sum)" in table


def test_main_rewrites_only_the_text_between_the_markers(tmp_path: Path) -> None:
    # Prepare
    results, readme = _write(tmp_path)

    # Execute
    assert main(["--results", str(results), "--readme", str(readme)]) == 0

    # Assert
    text = readme.read_text()
    assert "stale table" not in text
    assert text.startswith("# Benchmarks\n\nprose before\n\n" + BEGIN + "\n")
    assert text.endswith(END + "\n\nprose after\n")
    assert text.count("| toy | full |") == 2
    assert "untuned" not in text


def test_check_fails_on_a_stale_table_and_passes_once_regenerated(tmp_path: Path) -> None:
    # Prepare
    results, readme = _write(tmp_path)
    args = ["--results", str(results), "--readme", str(readme)]

    # Execute / Assert
    assert main([*args, "--check"]) == 1
    main(args)
    assert main([*args, "--check"]) == 0


def test_a_readme_without_markers_is_refused(tmp_path: Path) -> None:
    results, readme = _write(tmp_path)
    readme.write_text("# no markers\n")

    with pytest.raises(ValueError, match="markers"):
        main(["--results", str(results), "--readme", str(readme)])
