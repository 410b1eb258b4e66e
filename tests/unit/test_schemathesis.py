"""schemathesis against the API's own OpenAPI: no 5xx, and every response as documented."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from florist.server.api.app import create_app
from florist.server.settings import Settings

pytestmark = pytest.mark.slow

BODY: dict[str, Any] = {
    "name": "digits-fedavg",
    "strategy": {"name": "fedavg", "config": {}},
    "workload": {"name": "digits", "config": {"model": {"name": "mlp"}}},
    "rounds": 2,
}
# Bounded and derandomized: the same cases on every run, well under a minute in all.
EXAMPLES = 40
SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
# Every other check runs: not_a_server_error, status codes, content types, response schemas and
# headers, negative_data_rejection (a schema-invalid request must be refused). A request the
# schema allows may still be refused with 422 by what a schema cannot say (an unknown strategy
# name, a model too large for the dataset), so positive_data_acceptance is left out.
EXCLUDED = [positive_data_acceptance]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    home: Path = tmp_path_factory.mktemp("schemathesis")
    # A stream of an experiment that never finishes (nothing runs here) ends at its lifetime.
    app = create_app(
        Settings(
            home=home, database_url=f"sqlite:///{home / 'florist.db'}", sse_max_lifetime_s=0.05
        ),
        follow_runs=False,
    )
    with TestClient(app) as client:  # runs the lifespan: migrations, sessions
        # Rows for the {experiment_id} routes to find (small ids are drawn often): a pending
        # experiment and a cancelled one.
        for name in ("pending", "cancelled"):
            created = client.post("/api/v1/experiments", json={**BODY, "name": name})
            assert created.status_code == 201, created.text
        assert client.post(f"/api/v1/experiments/{created.json()['id']}/cancel").is_success
        yield app


@pytest.fixture(scope="module")
def schema(app: FastAPI) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _failures(operation: Any, mode: GenerationMode) -> list[str]:
    found: list[str] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @SETTINGS
    def run(case: Any) -> None:
        try:
            case.call_and_validate(excluded_checks=EXCLUDED)
        except Exception as exc:  # a failure group, or the app's own exception: kept, run on
            found.append(f"{operation.label} ({mode.value}): {exc}")

    try:
        run()
    except Unsatisfiable:  # no parameters and no body: nothing negative to send
        assert mode is GenerationMode.NEGATIVE
    return found


def test_every_operation_answers_as_documented(schema: Any) -> None:
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14  # every route, so none is silently left out

    failures = [
        failure
        for operation in operations
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        for failure in _failures(operation, mode)
    ]

    assert failures == [], "\n\n".join(failures[:5])


def test_stateful_sequences_answer_as_documented(schema: Any) -> None:
    base = schema.as_state_machine()

    class Machine(base):  # type: ignore[misc, valid-type]
        def validate_response(self, response: Any, case: Any, *args: Any, **kwargs: Any) -> None:
            case.validate_response(response, excluded_checks=EXCLUDED, recorder=self.recorder)

    # POST /experiments links to the routes of the experiment it created (its id): sequences
    # reach rows that exist, not only 404s.
    created = base._transitions.operations["POST /api/v1/experiments"].outgoing
    assert {link.target.label for link in created} >= {
        "GET /api/v1/experiments/{experiment_id}",
        "POST /api/v1/experiments/{experiment_id}/cancel",
    }

    Machine.run(
        settings=settings(
            max_examples=15,
            stateful_step_count=5,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )
