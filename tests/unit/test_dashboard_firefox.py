"""The dashboard's pages in headless Firefox ESR, on the same fake API as the Chromium tests."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.firefox import FIREFOX, Firefox
from tests.unit.test_dashboard_page import LiveServer, live_server  # noqa: F401 - the fixture

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not FIREFOX.exists(), reason=f"{FIREFOX} is missing; `apt-get install -y firefox-esr`"
    ),
]


@pytest.fixture(scope="module")
def firefox() -> Iterator[Firefox]:
    browser = Firefox()
    yield browser
    browser.close()


def count(selector: str) -> str:
    return f"document.querySelectorAll({selector!r}).length"


def test_experiments_page(firefox: Firefox, live_server: LiveServer) -> None:  # noqa: F811
    firefox.goto(f"{live_server.url}/")
    firefox.wait_for(f"{count('[data-testid=experiment-row]')} === 3")
    text = firefox.evaluate("document.querySelector('#experiments-table').textContent")
    assert "mnist-fedprox" in text and "completed" in text
    # The form comes after GET /strategies and GET /workloads, which may answer after the rows.
    firefox.wait_for(f"{count('#submit-form select, #submit-form input')} > 5")
    assert firefox.errors == []


def test_workload_form_swaps_a_unions_variant_fields(
    firefox: Firefox,
    live_server: LiveServer,  # noqa: F811
) -> None:
    firefox.goto(f"{live_server.url}/")
    firefox.wait_for("document.querySelector('#f-workload-config-partitioner') !== null")
    # evaluate hands back primitives only: the option list travels as JSON text.
    names = json.loads(
        firefox.evaluate(
            "JSON.stringify([...document.querySelectorAll('#f-workload option')].map(o => o.value))"
        )
    )
    assert {"digits", "synthetic", "tiny-text"} <= set(names)

    # Choose digits, then the dirichlet partitioner, as a user's select would (a change event).
    firefox.evaluate(
        """(() => {
            const choose = (selector, value) => {
                const select = document.querySelector(selector);
                select.value = value;
                select.dispatchEvent(new Event('change'));
            };
            choose('#f-workload', 'digits');
            choose('#f-workload-config-partitioner', 'dirichlet');
            choose('#f-workload-config-model', 'mlp');
        })()"""
    )

    alpha = "document.querySelector('#f-workload-config-partitioner-alpha')"
    assert firefox.evaluate(f"{alpha}.value") == "0.5"
    assert firefox.evaluate(f"{alpha}.min") == "0"
    hidden = "document.querySelector('#f-workload-config-model-hidden')"
    assert firefox.evaluate(f"{hidden}.value") == "64"  # the schema's default widths
    assert firefox.errors == []


def test_experiment_page_draws_its_charts(firefox: Firefox, live_server: LiveServer) -> None:  # noqa: F811
    rounds = len(live_server.api.rounds[1])
    firefox.goto(f"{live_server.url}/experiments/1")
    firefox.wait_for(f"{count('#accuracy-chart circle')} >= {rounds}")
    firefox.wait_for(f"{count('#client-timeline rect[data-testid=task-bar]')} > 0")
    assert "Round" in firefox.evaluate("document.querySelector('#round-counter').textContent")
    assert firefox.errors == []


def test_unknown_experiment_and_compare(firefox: Firefox, live_server: LiveServer) -> None:  # noqa: F811
    firefox.goto(f"{live_server.url}/experiments/42")
    firefox.wait_for("!document.querySelector('#not-found').hidden")
    firefox.goto(f"{live_server.url}/compare?ids=1,2")
    firefox.wait_for(f"{count('#compare-chart g.chart-series')} === 2")
    firefox.goto(f"{live_server.url}/nodes")
    firefox.wait_for(f"{count('[data-testid=node-row]')} === 2")
    assert firefox.errors == []
