"""The dashboard in headless Chromium on the real stack: submit through the form, watch it live."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from florist.server.db import repository as repo
from florist.server.db.engine import make_engine, make_session_factory
from florist.server.spec import ExperimentSpec, experiment_row
from tests.chromium import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS

from .conftest import NUM_NODES, Api, FlowerStack, start_stack

RUN_TIMEOUT_MS = 240_000

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing"),
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]

SECOND: dict[str, Any] = {
    "name": "browser-fedprox",
    "strategy": {"name": "fedprox", "config": {"proximal_mu": 0.01}},
    "workload": {
        "name": "digits",
        "config": {"partitioner": {"name": "iid"}, "seed": 0, "model": {"name": "mlp"}},
    },
    "rounds": 2,
    "clients": {"min": 3},
}


@pytest.fixture(scope="module")
def flower_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerStack]:
    """Slow SuperNodes: a round takes seconds, so the page has a partial run to show."""
    nodes: list[dict[str, int | float | str]] = [{"profile": "slow"} for _ in range(NUM_NODES)]
    with start_stack(tmp_path_factory.mktemp("flower"), nodes) as stack:
        yield stack


@pytest.fixture
def page() -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser: Browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        context = browser.new_context(viewport={"width": 1366, "height": 900})
        page = context.new_page()
        page.set_default_timeout(15_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        browser.close()
        assert errors == [], errors


def live_round(entry: str) -> int:
    """The round of one observed ``counter|chart points|status`` state; the two must agree."""
    counter, points, _status = entry.split("|")
    match = re.fullmatch(r"Round (\d+) / 3", counter)
    assert match is not None, entry
    assert int(match.group(1)) == int(points), entry
    return int(match.group(1))


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_submit_watch_compare_and_nodes(api: Api, page: Page) -> None:
    # Prepare: the form, filled in as a user would.
    page.goto(api.base + "/")
    expect(page.locator("#submit-form")).to_be_visible()
    page.locator("#f-name").fill("browser-fedavg")
    page.locator("#f-strategy").select_option("fedavg")
    # The workload's fields come from GET /workloads' schemas: a union's variant brings its own.
    page.locator("#f-workload").select_option("digits")
    page.locator("#f-workload-config-partitioner").select_option("iid")
    page.locator("#f-workload-config-model").select_option("mlp")
    page.locator("#f-workload-config-model-hidden").fill("16")
    page.locator("#f-rounds").fill("3")
    page.locator("#f-min-clients").fill("3")
    shot(page, "dashboard-experiments-form")

    # Execute
    page.locator("#submit-button").click()

    # Assert: the new experiment's page, updated by its event stream while the run progresses.
    expect(page).to_have_url(re.compile(r"/experiments/\d+$"))
    experiment_id = int(page.url.rsplit("/", 1)[1])
    expect(page.locator("#detail-title")).to_have_text(f"#{experiment_id} · browser-fedavg")
    # Stored as a workload with its nested config, as the form filled it in.
    stored = api.client.get(f"/api/v1/experiments/{experiment_id}").json()["workload"]
    assert stored["name"] == "digits", stored
    assert stored["config"]["partitioner"] == {"name": "iid"}, stored
    assert stored["config"]["model"] == {"name": "mlp", "hidden": [16], "dropout": 0.0}, stored
    expect(page.locator("#experiment-detail dl.facts")).to_contain_text("hidden=[16]")
    page.evaluate(
        """() => {
            window.__sameDocument = true;
            window.__seen = [];
            const note = () => {
                const counter = document.querySelector('#round-counter');
                const points = document.querySelectorAll(
                    '#accuracy-chart circle[data-series="accuracy"]').length;
                const status = document.querySelector('#detail-status');
                const entry = [
                    counter ? counter.textContent : '', points, status ? status.textContent : '',
                ].join('|');
                if (window.__seen.at(-1) !== entry) window.__seen.push(entry);
            };
            note();
            new MutationObserver(note).observe(
                document.getElementById('experiment-detail'), {childList: true, subtree: true});
        }"""
    )
    expect(page.locator("#round-counter")).to_have_text("Round 3 / 3", timeout=RUN_TIMEOUT_MS)
    expect(page.locator("#detail-status")).to_have_text("completed", timeout=60_000)
    expect(page.locator("#stream-state")).to_have_text("finished")
    expect(page.locator('#accuracy-chart circle[data-series="accuracy"]')).to_have_count(3)
    # Every dataset has a validation split now: its curve sits beside the test one.
    expect(page.locator('#accuracy-chart circle[data-series="val-accuracy"]')).to_have_count(3)
    expect(page.get_by_test_id("detail-best-round")).to_contain_text("best validation accuracy")
    expect(page.get_by_test_id("round-row")).to_have_count(3)
    expect(page.locator("#client-timeline [data-testid=task-bar]")).to_have_count(9)
    expect(page.get_by_test_id("client-row")).to_have_count(3)
    # FedAvg's synchronous rounds decide no policy, but the panel is there to say so.
    expect(page.locator("#decisions")).to_contain_text("No policy decision recorded.")
    # The run is over and the SuperLink has every node online: each is idle now.
    for status in page.get_by_test_id("client-status").all():
        expect(status).to_have_text("idle")
    seen = page.evaluate("window.__seen")
    assert page.evaluate("window.__sameDocument") is True
    # The stream batches what the database holds at each poll, so two rounds may land in one
    # update; what must hold is that the page moved through a partial run, live, to the end.
    rounds = [live_round(entry) for entry in seen]
    assert rounds == sorted(rounds), seen
    assert any(
        0 < k < 3 and entry.endswith("|running") for k, entry in zip(rounds, seen, strict=True)
    ), seen
    assert seen[-1] == "Round 3 / 3|3|completed", seen
    shot(page, "dashboard-experiment")
    page.locator('#x-axis-toggle button[data-x="time"]').click()
    expect(page.locator("#accuracy-chart")).to_contain_text("wall time")
    expect(page.locator('#accuracy-chart circle[data-series="accuracy"]')).to_have_count(3)

    # Prepare: one more experiment to compare with.
    other = api.submit(SECOND)
    assert api.wait_finished(other["id"])["status"] == "completed"

    # Execute: pick both on the list, press Compare.
    page.goto(api.base + "/")
    for picked in (experiment_id, other["id"]):
        row = page.locator(f'#experiments-table tr[data-experiment-id="{picked}"]')
        expect(row.get_by_test_id("status-badge")).to_have_text("completed")
        row.get_by_test_id("compare-pick").check()
    shot(page, "dashboard-experiments")
    page.locator("#compare-button").click()

    # Assert
    expect(page).to_have_url(re.compile(r"/compare\?ids="))
    expect(page.get_by_test_id("compare-row")).to_have_count(2)
    expect(page.locator("#compare-chart g.chart-series")).to_have_count(2)
    expect(page.locator("#compare-chart circle")).to_have_count(5)
    shot(page, "dashboard-compare")

    # Synchronous rounds record when each task left and came back, not only the round's end.
    rounds = {
        r["server_round"]: r
        for r in api.client.get(f"/api/v1/experiments/{experiment_id}/rounds").json()["data"]
    }
    updates = api.client.get(f"/api/v1/experiments/{experiment_id}/updates").json()["data"]
    assert len(updates) == 9
    for u in updates:
        finished = datetime.fromisoformat(rounds[u["server_round"]]["finished_at"])
        dispatched, arrived = (
            datetime.fromisoformat(u[k]) for k in ("dispatched_at", "arrived_at")
        )
        assert dispatched <= arrived <= finished, u
        assert u["model_version"] == u["server_round"] - 1 and u["wall_duration_s"] > 0, u
    # Each round announced its work as it left, in the log the dashboard reads.
    log = api.client.get(
        f"/api/v1/experiments/{experiment_id}/log", params={"kind": "dispatch"}
    ).json()
    assert log["count"] >= 3, log
    sent = {(e["data"]["server_round"], n) for e in log["data"] for n in e["data"]["node_ids"]}
    assert sent == {(u["server_round"], u["node_id"]) for u in updates}, log

    # Execute / Assert: the three SuperNodes, as the SuperLink lists them.
    nodes = api.client.get("/api/v1/nodes").json()
    assert nodes["superlink"] == "ok", nodes
    assert {n["node_id"] for n in nodes["data"]} == {u["node_id"] for u in updates}
    assert all(n["status"] == "online" and n["connected_at"] for n in nodes["data"]), nodes
    page.goto(api.base + "/nodes")
    expect(page.get_by_test_id("node-row")).to_have_count(3)
    expect(page.get_by_test_id("node-health").first).to_have_text("online")
    shot(page, "dashboard-nodes")


def test_unknown_and_failed_experiments_read_plainly(
    api: Api, page: Page, database_url: str
) -> None:
    # Prepare: a run that failed with a traceback in its error, written as the recorder would.
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            spec = ExperimentSpec.model_validate(SECOND | {"name": "browser-failed"})
            exp = repo.create_experiment(session, **experiment_row(spec))
            # Failed before the follower could pick it up: it never reaches the SuperLink.
            repo.update_experiment(
                session,
                experiment_id=exp.id,
                status="failed",
                error=(
                    "Traceback (most recent call last):\n"
                    '  File "/srv/florist/serverapp.py", line 1, in main\n'
                    "RuntimeError: only 1 of 3 clients connected\n"
                ),
            )
            session.commit()
            failed_id = exp.id
    finally:
        engine.dispose()

    # Execute / Assert
    page.goto(f"{api.base}/experiments/{failed_id}")
    error = page.locator("#error-message")
    expect(error).to_contain_text("RuntimeError: only 1 of 3 clients connected")
    expect(error).not_to_contain_text("Traceback")
    expect(page.locator("#detail-status")).to_have_text("failed")
    shot(page, "dashboard-experiment-failed")
    page.goto(f"{api.base}/experiments/987654")
    expect(page.locator("#not-found")).to_have_text("Experiment 987654 not found")
