"""The experiment status table, and that only the repository writes experiments rows."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from florist.server.db.models import Experiment
from florist.server.db.status import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    TRANSITIONS,
    ExperimentStatus,
    IllegalTransition,
    as_status,
    finish_plan,
    legal_moves,
    plan_target,
    start_plan,
    to_status,
)

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("server", "client", "strategies", "datasets")
S = ExperimentStatus


def test_statuses_are_their_plain_strings() -> None:
    assert S.RUNNING == "running" and f"{S.RUNNING}" == "running"
    assert {"pending": 1}[S.PENDING] == 1
    assert as_status("failed") is S.FAILED
    with pytest.raises(ValueError, match=r"unknown status 'done'; known: \['pending'"):
        as_status("done")


def test_the_table_is_closed_and_every_status_is_reachable() -> None:
    # Prepare
    reachable = {S.PENDING}
    frontier = [S.PENDING]

    # Execute
    while frontier:
        for to in TRANSITIONS[frontier.pop()]:
            if to not in reachable:
                reachable.add(to)
                frontier.append(to)

    # Assert
    assert set(TRANSITIONS) == set(ExperimentStatus) == reachable
    assert {S.COMPLETED, S.FAILED, S.CANCELLED} == TERMINAL_STATUSES
    assert set(ExperimentStatus) - TERMINAL_STATUSES == ACTIVE_STATUSES
    assert all(current not in targets for current, targets in TRANSITIONS.items())


def test_plans_decide_per_current_status() -> None:
    # A run's start: running, a cancel under way kept, an ended experiment refused.
    assert plan_target(start_plan(), S.SUBMITTED) is S.RUNNING
    assert plan_target(start_plan(), S.CANCELLING) is S.CANCELLING
    with pytest.raises(IllegalTransition, match="experiment 4 is 'cancelled'"):
        plan_target(start_plan(), S.CANCELLED, experiment_id=4)
    # A run's end: a cancel wins; the same end again writes nothing; another end is refused.
    assert plan_target(finish_plan(S.FAILED), S.RUNNING) is S.FAILED
    assert plan_target(finish_plan(S.COMPLETED), S.CANCELLING) is S.CANCELLED
    assert plan_target(finish_plan(S.COMPLETED), S.CANCELLED) is None
    assert plan_target(finish_plan(S.COMPLETED), S.COMPLETED) is None
    with pytest.raises(IllegalTransition) as refused:
        plan_target(finish_plan(S.COMPLETED), S.FAILED)
    assert (refused.value.current, refused.value.to) == (S.FAILED, S.COMPLETED)
    with pytest.raises(ValueError, match="does not end"):
        finish_plan(S.RUNNING)
    # What the repository's UPDATE may do for a finish: no pending, no repeat, no other end.
    assert legal_moves(finish_plan(S.COMPLETED)) == {
        S.SUBMITTED: S.COMPLETED,
        S.RUNNING: S.COMPLETED,
        S.CANCELLING: S.CANCELLED,
    }
    # A plain change; a plain string for the current status is welcome.
    assert plan_target(to_status(S.CANCELLING), "running") is S.CANCELLING  # type: ignore[arg-type]
    with pytest.raises(IllegalTransition):
        plan_target(to_status(S.SUBMITTED), S.RUNNING)


# --- only the repository writes experiments rows --------------------------------------------

_COLUMNS = frozenset(Experiment.__table__.columns.keys())
_RAW_SQL = re.compile(r"\b(insert\s+into|update|delete\s+from)\s+\"?experiments\b", re.IGNORECASE)


def experiment_writes(source: str) -> list[str]:
    """Where ``source`` creates, updates or deletes experiments rows by itself.

    Looks for ``Experiment(...)``, ``update/insert/delete(Experiment)``, raw SQL on the table,
    and, in a module that imports the Experiment model, any assignment (or setattr) of one of
    its column names: a row loaded there must not be changed there.
    """
    tree = ast.parse(source)
    found = [f"raw SQL {m.group(0)!r}" for m in _RAW_SQL.finditer(source)]
    imports_model = any(
        isinstance(node, ast.ImportFrom) and any(a.name == "Experiment" for a in node.names)
        for node in ast.walk(tree)
    )
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else None
            name = node.func.id if isinstance(node.func, ast.Name) else name
            first = node.args[0] if node.args else None
            if name == "Experiment":
                found.append(f"line {node.lineno}: Experiment(...)")
            elif (
                name in ("update", "insert", "delete")
                and isinstance(first, ast.Name)
                and first.id == "Experiment"
            ):
                found.append(f"line {node.lineno}: {name}(Experiment)")
            elif name == "setattr" and imports_model:
                found.append(f"line {node.lineno}: setattr")
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            if imports_model and isinstance(target, ast.Attribute) and target.attr in _COLUMNS:
                found.append(f"line {node.lineno}: .{target.attr} = ...")
    return found


def test_the_check_finds_each_kind_of_write() -> None:
    bad = (
        "from florist.server.db.models import Experiment\n"
        "from sqlalchemy import update\n"
        "session.add(Experiment(name='x'))\n"
        "session.execute(update(Experiment).values(status='running'))\n"
        "exp.status = 'running'\n"
        "setattr(exp, 'error', 'x')\n"
        "session.execute(text('UPDATE experiments SET status = 1'))\n"
    )
    assert len(experiment_writes(bad)) == 5
    # Without the model imported, a run's status may be set (the SQL recorder does).
    assert experiment_writes("run.status = 'failed'\n") == []


def test_no_module_outside_the_database_package_writes_experiments_rows() -> None:
    # Prepare
    sources = [
        path
        for folder in PACKAGE_DIRS
        for path in sorted((ROOT / folder).rglob("*.py"))
        if (ROOT / "server" / "db") not in path.parents
    ]
    assert len(sources) > 20 and ROOT / "server" / "follower.py" in sources

    # Execute
    writes = {
        str(path.relative_to(ROOT)): found
        for path in sources
        if (found := experiment_writes(path.read_text()))
    }

    # Assert
    assert writes == {}


def test_the_dashboards_status_sets_match_the_enum() -> None:
    # The dashboard cannot import Python; its two sets must follow the table.
    source = (ROOT / "server" / "dashboard" / "static" / "dom.js").read_text()

    def js_set(name: str) -> set[str]:
        match = re.search(rf"export const {name} = new Set\(\[([^\]]*)\]\)", source)
        assert match is not None, name
        return set(re.findall(r'"([a-z]+)"', match.group(1)))

    assert js_set("ACTIVE_STATUSES") == {s.value for s in ACTIVE_STATUSES}
    # Cancellable: active, and not already being cancelled (the API answers 409 only to ended).
    assert js_set("CANCELLABLE_STATUSES") == {s.value for s in ACTIVE_STATUSES - {S.CANCELLING}}
