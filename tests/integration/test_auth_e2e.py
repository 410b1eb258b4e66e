"""Auth on the real API process (`florist api`, uvicorn) with tokens made by `florist token`:
401, 403, 201, cross-origin 403, revocation; and the dashboard's login in headless Chromium."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from florist.server.processes import free_port, wait_for_port
from tests.chromium import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS

from ..unit.test_api import BODY

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing")


@dataclass
class Served:
    base: str
    env: dict[str, str]
    log: Path

    def florist(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        """The real CLI, on the same database and API."""
        env = self.env | ({"FLORIST_TOKEN": token} if token else {})
        return subprocess.run(
            [sys.executable, "-m", "florist.server.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def token(self, role: str) -> str:
        made = self.florist("token", "create", "--role", role, "--name", f"{role}-1")
        assert made.returncode == 0, made.stderr
        return made.stdout.strip()


@contextmanager
def serve(tmp_path: Path, auth: str) -> Iterator[Served]:
    """`florist api` in its own process; no SuperLink (nothing runs: the follower retries)."""
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("FLORIST_") or k == "FLORIST_HOME"
    }
    env |= {
        "FLORIST_HOME": str(tmp_path),
        "FLORIST_DATABASE_URL": f"sqlite:///{tmp_path / 'florist.db'}",
        "FLORIST_API_HOST": "127.0.0.1",
        "FLORIST_API_PORT": str(port),
        "FLORIST_AUTH": auth,
        "FLORIST_SUPERLINK_CONTROL": f"127.0.0.1:{free_port()}",
    }
    log = tmp_path / "api.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "florist.server.cli", "api"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(f"127.0.0.1:{port}", timeout=60)
        yield Served(f"http://127.0.0.1:{port}", env, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_tokens_roles_origin_and_revocation_on_the_real_api(tmp_path: Path) -> None:
    with serve(tmp_path, "on") as api, httpx.Client(base_url=api.base, timeout=30) as http:
        reader, operator = api.token("reader"), api.token("operator")

        anonymous = http.post("/api/v1/experiments", json=BODY)
        as_reader = http.post("/api/v1/experiments", json=BODY, headers=bearer(reader))
        as_operator = http.post("/api/v1/experiments", json=BODY, headers=bearer(operator))

        assert anonymous.status_code == 401, anonymous.text
        assert anonymous.headers["www-authenticate"].startswith("Bearer")
        assert as_reader.status_code == 403, as_reader.text
        assert as_operator.status_code == 201, as_operator.text
        experiment_id = as_operator.json()["id"]
        cancel = f"/api/v1/experiments/{experiment_id}/cancel"

        # A logged-in browser session: cookie and CSRF header are right, the origin is not.
        login = http.post("/api/v1/session", json={"token": operator})
        assert login.status_code == 200, login.text
        csrf = {"X-CSRF-Token": http.cookies["florist_csrf"]}
        evil = http.post(cancel, headers=csrf | {"Origin": "http://evil.example"})
        other_port = http.post(cancel, headers=csrf | {"Origin": "http://127.0.0.1:1"})
        assert evil.status_code == 403 and "cross-origin" in evil.json()["detail"]
        assert other_port.status_code == 403  # same site, another origin: still refused
        exp = http.get(f"/api/v1/experiments/{experiment_id}").json()
        assert exp["status"] not in ("cancelling", "cancelled"), exp
        own = http.post("/api/v1/experiments", json=BODY, headers=csrf | {"Origin": api.base})
        assert own.status_code == 201, own.text

        # The CLI: FLORIST_TOKEN as a bearer token, a clear hint without one.
        listed = api.florist("ls", "--json", token=reader)
        refused = api.florist("ls")
        assert listed.returncode == 0, listed.stderr
        assert f'"id":{experiment_id}' in listed.stdout.replace(" ", "")
        assert refused.returncode == 1 and "FLORIST_TOKEN" in refused.stderr
        cancel_as_reader = api.florist("cancel", str(experiment_id), token=reader)
        assert cancel_as_reader.returncode == 1 and "role" in cancel_as_reader.stderr

        # Revoked with the CLI: the token and the session opened with it stop at once.
        token_id = operator.split("_")[1]
        assert api.florist("token", "revoke", token_id).returncode == 0
        assert http.get("/api/v1/experiments", headers=bearer(operator)).status_code == 401
        assert http.get("/api/v1/experiments").status_code == 401  # the cookie
        assert http.get("/api/v1/experiments", headers=bearer(reader)).status_code == 200
        assert http.get("/api/v1/healthz").status_code == 200

    assert "API auth: on" in api.log.read_text()


@pytest.fixture
def page() -> Iterator[Page]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = chromium.new_context(viewport={"width": 1366, "height": 900}).new_page()
        page.set_default_timeout(15_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        chromium.close()
        assert errors == [], errors


@pytest.mark.browser
@needs_chromium
def test_a_reader_logs_in_sees_experiments_and_cannot_cancel(tmp_path: Path, page: Page) -> None:
    with serve(tmp_path, "on") as api:
        reader, operator = api.token("reader"), api.token("operator")
        created = httpx.post(
            f"{api.base}/api/v1/experiments",
            json=BODY | {"name": "seen-by-reader"},
            headers=bearer(operator),
        )
        assert created.status_code == 201, created.text
        experiment_id = created.json()["id"]

        # Not logged in: the dashboard sends the browser to the login page.
        page.goto(api.base + "/")
        expect(page).to_have_url(f"{api.base}/login?next=%2F")
        page.locator("#login-token").fill(reader[:-1])
        page.locator("#login-button").click()
        expect(page.locator("#login-error")).to_contain_text("unknown, revoked or expired")
        page.locator("#login-token").fill(reader)
        page.locator("#login-button").click()

        expect(page).to_have_url(api.base + "/")
        expect(page.locator("#experiments-body")).to_contain_text("seen-by-reader")
        expect(page.locator("#auth-user")).to_have_text("reader-1 (reader)")
        expect(page.locator("#auth-banner")).to_be_hidden()
        expect(page.locator("#submit-form-box")).to_be_hidden()
        for button in page.locator('[data-testid="row-cancel"]').all():
            expect(button).to_be_hidden()
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "dashboard-reader.png"), full_page=True)

        cookies = {c["name"]: c for c in page.context.cookies()}
        session, csrf = cookies["florist_session"], cookies["florist_csrf"]
        assert session["httpOnly"] and session["sameSite"] == "Strict"
        assert not session["secure"]  # served over http here; https sets Secure
        assert not csrf["httpOnly"] and csrf["sameSite"] == "Strict"

        # The experiment's page: its live stream works with the cookie; no cancel button.
        with page.expect_response(lambda r: r.url.endswith(f"/{experiment_id}/events")) as sse:
            page.goto(f"{api.base}/experiments/{experiment_id}")
        assert sse.value.status == 200
        expect(page.locator("#detail-title")).to_contain_text("seen-by-reader")
        expect(page.locator("#cancel-button")).to_be_hidden()  # hidden, or not drawn at all
        # Past the hidden button, as a script on the page would: the API itself says no.
        status = page.evaluate(
            """async (id) => {
                const csrf = document.cookie.match(/florist_csrf=([^;]*)/)[1];
                const r = await fetch(`/api/v1/experiments/${id}/cancel`,
                    {method: "POST", headers: {"X-CSRF-Token": csrf}});
                return r.status;
            }""",
            experiment_id,
        )
        assert status == 403

        # Logging out ends the session: the API refuses the old cookie.
        page.locator("#logout-button").click()
        expect(page).to_have_url(api.base + "/login")
        after = page.evaluate("async () => (await fetch('/api/v1/experiments')).status")
        assert after == 401


@pytest.mark.browser
@needs_chromium
def test_open_mode_says_so_on_the_dashboard_and_console(tmp_path: Path, page: Page) -> None:
    with serve(tmp_path, "auto") as api:  # loopback: open
        page.goto(api.base + "/")
        expect(page.locator("#auth-banner")).to_be_visible()
        expect(page.locator("#auth-banner")).to_contain_text("Open mode")
        expect(page.locator("#submit-form-box")).to_be_visible()

    assert "API auth: OPEN" in api.log.read_text()
