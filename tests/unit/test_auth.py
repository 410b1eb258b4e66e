"""API authentication: the rule table, token hashing, expiry and revocation, sessions and CSRF,
Origin and Host checks, the settings' refusals, and `florist token`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from florist.server import cli
from florist.server.api.app import create_app
from florist.server.api.auth import (
    CSRF_COOKIE,
    CSRF_HEADER,
    SESSION_COOKIE,
    host_allowed,
    host_name,
    required_role,
)
from florist.server.db.models import ApiSession, ApiToken, utcnow
from florist.server.settings import Settings
from florist.server.tokens import (
    Role,
    TokenConflict,
    create_token,
    csrf_for,
    generate_token,
    open_session,
    revoke_token,
    verify_session,
    verify_token,
)

from .test_api import BODY

READ, OPERATE, ADMIN = Role.READER, Role.OPERATOR, Role.ADMIN


# --- the rule table ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "role"),
    [
        ("GET", "/api/v1/healthz", None),
        ("GET", "/api/v1/session", None),
        ("POST", "/api/v1/session", None),
        ("DELETE", "/api/v1/session", None),
        ("GET", "/api/v1/experiments", READ),
        ("HEAD", "/api/v1/experiments", READ),
        ("GET", "/api/v1/experiments/3/events", READ),  # the SSE stream
        ("GET", "/api/v1/experiments/3/model", READ),
        ("GET", "/api/v1/nodes", READ),
        ("POST", "/api/v1/experiments", OPERATE),
        ("POST", "/api/v1/experiments/3/cancel", OPERATE),
        ("POST", "/api/v1/experiments/3/resume", OPERATE),
        ("PUT", "/api/v1/anything-new", OPERATE),
        ("GET", "/api/v1/tokens", ADMIN),
        ("POST", "/api/v1/tokens", ADMIN),
        ("DELETE", "/api/v1/tokens/abc", ADMIN),
        ("GET", "/api/v1/node-keys", ADMIN),  # the TLS work's routes: covered by their prefix
        ("POST", "/api/v1/node-keys", ADMIN),
        ("DELETE", "/api/v1/node-keys/k1", ADMIN),
        ("GET", "/api/v1/tokensmith", READ),  # a prefix ends at a path segment
        ("GET", "/api/v1/healthz/more", None),
        ("POST", "/api/v1/healthz", OPERATE),
        ("GET", "/metrics", READ),
        ("GET", "/openapi.json", READ),
        ("GET", "/docs", READ),
        ("GET", "/", None),
        ("GET", "/experiments/3", None),  # a dashboard page: data comes from /api
        ("GET", "/static/app.js", None),
        ("GET", "/login", None),
        ("POST", "/", OPERATE),
    ],
)
def test_rule_table(method: str, path: str, role: Role | None) -> None:
    assert required_role(method, path) == role


@pytest.mark.slow  # builds the whole app and its OpenAPI
def test_every_api_route_but_health_and_session_needs_a_login(tmp_path: Path) -> None:
    paths = create_app(Settings(home=tmp_path), follow_runs=False).openapi()["paths"]
    operations = [(m.upper(), path) for path, item in paths.items() for m in item]
    assert len(operations) >= 14
    for method, path in operations:
        role = required_role(method, path)
        if path in ("/api/v1/healthz", "/api/v1/session"):
            assert role is None, (method, path)
        elif path.startswith("/api/v1/node-keys"):  # which nodes may join: admins only
            assert role == Role.ADMIN, (method, path)
        else:
            assert role == (READ if method == "GET" else OPERATE), (method, path)


# --- tokens: hashing, expiry, revocation -----------------------------------------------------


@pytest.fixture
def db(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    with session_factory() as session:
        yield session


def test_a_token_is_stored_as_the_sha256_of_its_secret_only(db: Session) -> None:
    row, token = create_token(db, name="alice", role=Role.OPERATOR)
    db.commit()

    prefix, token_id, secret = token.split("_", 2)
    assert (prefix, token_id) == ("florist", row.id)
    assert len(secret) >= 43  # 32 random bytes, base64url
    assert row.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
    stored = db.get(ApiToken, row.id)
    assert stored is not None
    assert all(secret not in str(getattr(stored, c.key)) for c in ApiToken.__table__.columns)
    assert stored.role == "operator" and stored.last_used_at is None


def test_verify_token_accepts_the_token_and_nothing_near_it(db: Session) -> None:
    row, token = create_token(db, name="alice", role=Role.READER)
    other, other_token = create_token(db, name="bob", role=Role.ADMIN)
    db.commit()

    found = verify_token(db, token)
    assert found is not None and found.id == row.id
    assert found.last_used_at is not None
    assert verify_token(db, token[:-1]) is None  # a secret one character short
    assert verify_token(db, token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    # bob's id with alice's secret: the id only finds the row, the secret must match it
    assert verify_token(db, f"florist_{other.id}_{token.split('_', 2)[2]}") is None
    for junk in ("", "florist", "florist__", "Bearer " + token, token.replace("florist", "x")):
        assert verify_token(db, junk) is None, junk
    assert verify_token(db, other_token) is not None


def test_an_expired_or_revoked_token_is_refused(db: Session) -> None:
    row, token = create_token(db, name="ci", role=Role.OPERATOR, expires_in=timedelta(days=1))
    db.commit()
    assert verify_token(db, token) is not None

    row.expires_at = utcnow() - timedelta(seconds=1)
    db.commit()
    assert verify_token(db, token) is None

    row.expires_at = None
    db.commit()
    assert verify_token(db, token) is not None
    assert revoke_token(db, row.id) is not None
    db.commit()
    assert verify_token(db, token) is None
    assert revoke_token(db, "nosuchtoken0") is None


def test_sessions_end_at_expiry_and_with_their_token(db: Session) -> None:
    row, _ = create_token(db, name="alice", role=Role.READER)
    session_row, secret = open_session(db, row, timedelta(hours=1))
    db.commit()

    assert session_row.id == hashlib.sha256(secret.encode()).hexdigest()  # no cookie at rest
    assert verify_session(db, secret) is not None
    assert verify_session(db, secret + "x") is None

    session_row.expires_at = utcnow() - timedelta(seconds=1)
    db.commit()
    assert verify_session(db, secret) is None

    _, secret2 = open_session(db, row, timedelta(hours=1))
    db.commit()
    assert db.get(ApiSession, session_row.id) is None  # the expired one was swept
    assert verify_session(db, secret2) is not None
    revoke_token(db, row.id)
    db.commit()
    assert verify_session(db, secret2) is None


# --- the API with auth on (TestClient: Host testserver, allowed by tests/conftest.py) --------


def _app(tmp_path: Path, url: str, **extra: object) -> TestClient:
    settings = Settings(home=tmp_path, database_url=url, **extra)  # type: ignore[arg-type]
    return TestClient(create_app(settings, follow_runs=False))


@pytest.fixture
def guarded(tmp_path: Path, migrated_url: str) -> Iterator[tuple[TestClient, dict[Role, str]]]:
    """The API with auth on, and a token of each role."""
    with _app(tmp_path, migrated_url, auth="on") as client:
        sessions = client.app.state.sessions  # type: ignore[attr-defined]
        with sessions() as db:
            tokens = {role: create_token(db, name=role.label, role=role)[1] for role in Role}
            db.commit()
        yield client, tokens


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_writes_need_an_operator_token(guarded: tuple[TestClient, dict[Role, str]]) -> None:
    client, tokens = guarded

    anonymous = client.post("/api/v1/experiments", json=BODY)
    reader = client.post("/api/v1/experiments", json=BODY, headers=bearer(tokens[READ]))
    bad = client.post("/api/v1/experiments", json=BODY, headers=bearer(tokens[READ] + "x"))
    operator = client.post("/api/v1/experiments", json=BODY, headers=bearer(tokens[OPERATE]))

    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"] == 'Bearer realm="florist"'
    assert "florist token create" in anonymous.json()["detail"]
    assert bad.status_code == 401
    assert "invalid_token" in bad.headers["WWW-Authenticate"]
    assert reader.status_code == 403
    assert reader.json()["detail"].startswith("this needs the operator role")
    assert operator.status_code == 201, operator.text
    listed = client.get("/api/v1/experiments", headers=bearer(tokens[READ])).json()
    assert listed["count"] == 1  # only the operator's experiment was stored


def test_reads_need_a_reader_token_and_health_none(
    guarded: tuple[TestClient, dict[Role, str]],
) -> None:
    client, tokens = guarded

    assert client.get("/api/v1/healthz").status_code == 200
    assert client.get("/").status_code == 200  # the page; its data needs a login
    assert client.get("/login").status_code == 200
    for path in ("/api/v1/experiments", "/metrics", "/openapi.json", "/api/v1/nodes"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers=bearer(tokens[READ])).status_code == 200, path
    # node keys are the admin's: 403 for an operator, the list for an admin
    assert client.get("/api/v1/node-keys", headers=bearer(tokens[OPERATE])).status_code == 403
    assert client.get("/api/v1/node-keys", headers=bearer(tokens[ADMIN])).status_code == 200


def _log_in(client: TestClient, token: str) -> str:
    response = client.post("/api/v1/session", json={"token": token})
    assert response.status_code == 200, response.text
    return client.cookies[CSRF_COOKIE]


def test_login_sets_strict_httponly_cookies(guarded: tuple[TestClient, dict[Role, str]]) -> None:
    client, tokens = guarded

    response = client.post("/api/v1/session", json={"token": tokens[OPERATE]})

    assert response.json()["role"] == "operator" and response.json()["authenticated"]
    cookies = {c.split("=", 1)[0]: c.lower() for c in response.headers.get_list("set-cookie")}
    assert "httponly" in cookies[SESSION_COOKIE] and "samesite=strict" in cookies[SESSION_COOKIE]
    assert "httponly" not in cookies[CSRF_COOKIE] and "samesite=strict" in cookies[CSRF_COOKIE]
    assert "secure" not in cookies[SESSION_COOKIE]  # plain http here; https sets Secure
    assert "max-age=43200" in cookies[SESSION_COOKIE]
    secret = client.cookies[SESSION_COOKIE]
    assert client.cookies[CSRF_COOKIE] == csrf_for(secret)
    who = client.get("/api/v1/session").json()
    assert who["authenticated"] and who["name"] == "operator"
    assert client.post("/api/v1/session", json={"token": "florist_x_y"}).status_code == 401


def test_cookies_are_secure_over_https(tmp_path: Path, migrated_url: str) -> None:
    settings = Settings(home=tmp_path, database_url=migrated_url, auth="on")
    with TestClient(create_app(settings, follow_runs=False), base_url="https://testserver") as c:
        with c.app.state.sessions() as db:  # type: ignore[attr-defined]
            _, token = create_token(db, name="alice", role=Role.READER)
            db.commit()
        response = c.post("/api/v1/session", json={"token": token})

    cookies = [c.lower() for c in response.headers.get_list("set-cookie")]
    assert len(cookies) == 2 and all("; secure" in cookie for cookie in cookies), cookies


def test_a_cookie_write_needs_the_csrf_header(
    guarded: tuple[TestClient, dict[Role, str]],
) -> None:
    client, tokens = guarded
    csrf = _log_in(client, tokens[OPERATE])

    assert client.get("/api/v1/experiments").status_code == 200  # a read needs no header
    missing = client.post("/api/v1/experiments", json=BODY)
    flipped = csrf[:-1] + ("1" if csrf.endswith("0") else "0")
    wrong = client.post("/api/v1/experiments", json=BODY, headers={CSRF_HEADER: flipped})
    right = client.post("/api/v1/experiments", json=BODY, headers={CSRF_HEADER: csrf})

    assert missing.status_code == 403 and CSRF_HEADER in missing.json()["detail"]
    assert wrong.status_code == 403
    assert right.status_code == 201, right.text
    cancel = client.post(
        f"/api/v1/experiments/{right.json()['id']}/cancel", headers={CSRF_HEADER: csrf}
    )
    assert cancel.status_code == 200


def test_logout_and_revocation_end_the_session(
    guarded: tuple[TestClient, dict[Role, str]],
) -> None:
    client, tokens = guarded
    _log_in(client, tokens[READ])
    secret = client.cookies[SESSION_COOKIE]
    assert client.get("/api/v1/experiments").status_code == 200

    assert client.delete("/api/v1/session").status_code == 204
    client.cookies.set(SESSION_COOKIE, secret)  # a stolen copy of the cookie
    assert client.get("/api/v1/experiments").status_code == 401

    client.cookies.clear()
    _log_in(client, tokens[READ])
    sessions = client.app.state.sessions  # type: ignore[attr-defined]
    with sessions() as db:
        revoke_token(db, tokens[READ].split("_")[1])
        db.commit()
    assert client.get("/api/v1/experiments").status_code == 401
    assert client.get("/api/v1/experiments", headers=bearer(tokens[READ])).status_code == 401


# --- Origin and Host: in open mode too -----------------------------------------------------


def test_a_cross_origin_write_is_refused_in_open_mode(tmp_path: Path, migrated_url: str) -> None:
    with _app(tmp_path, migrated_url) as client:  # loopback: open
        created = client.post("/api/v1/experiments", json=BODY)
        assert created.status_code == 201
        cancel = f"/api/v1/experiments/{created.json()['id']}/cancel"

        # What the review did: a form on another site posts the cancel ("simple" request).
        evil = client.post(cancel, headers={"Origin": "http://evil.example"})
        evil_referer = client.post(cancel, headers={"Referer": "http://evil.example/x.html"})
        null = client.post(cancel, headers={"Origin": "null"})
        own = client.post(cancel, headers={"Origin": "http://testserver"})

    assert evil.status_code == 403 and "cross-origin" in evil.json()["detail"]
    assert evil_referer.status_code == 403
    assert null.status_code == 403
    assert own.status_code == 200 and own.json()["status"] == "cancelled"


def test_a_configured_origin_may_write_and_gets_cors(tmp_path: Path, migrated_url: str) -> None:
    site = "https://lab.example.org"
    with _app(tmp_path, migrated_url, cors_origins=[site]) as client:
        allowed = client.post("/api/v1/experiments", json=BODY, headers={"Origin": site})
        preflight = client.options(
            "/api/v1/experiments",
            headers={"Origin": site, "Access-Control-Request-Method": "POST"},
        )
    with _app(tmp_path, migrated_url) as plain:
        no_cors = plain.get("/api/v1/experiments", headers={"Origin": site})

    assert allowed.status_code == 201
    assert allowed.headers["access-control-allow-origin"] == site
    assert preflight.status_code == 200
    assert "access-control-allow-origin" not in no_cors.headers  # CORS off by default


def test_an_unknown_host_is_refused(tmp_path: Path, migrated_url: str) -> None:
    with _app(tmp_path, migrated_url) as client:
        rebound = client.get("/api/v1/experiments", headers={"Host": "evil.example:8080"})
        loopback = client.get("/api/v1/experiments", headers={"Host": "127.0.0.1:8080"})

    assert rebound.status_code == 400 and "FLORIST_ALLOWED_HOSTS" in rebound.json()["detail"]
    assert loopback.status_code == 200


@pytest.mark.parametrize(
    ("header", "api_host", "allowed", "ok"),
    [
        ("localhost:8080", "127.0.0.1", [], True),
        ("127.0.0.1", "127.0.0.1", [], True),
        ("[::1]:8080", "127.0.0.1", [], True),
        ("127.8.9.1:1", "127.0.0.1", [], True),
        ("evil.example", "127.0.0.1", [], False),
        ("florist.lab.org:443", "florist.lab.org", [], True),
        ("FLORIST.lab.org", "florist.lab.org", [], True),
        ("10.0.0.5:8080", "0.0.0.0", [], False),  # binding every address names no host
        ("10.0.0.5:8080", "0.0.0.0", ["10.0.0.5"], True),
        ("anything", "0.0.0.0", ["*"], True),
        (None, "127.0.0.1", [], False),
    ],
)
def test_host_allowed(header: str | None, api_host: str, allowed: list[str], ok: bool) -> None:
    settings = Settings.model_construct(
        api_host=api_host, allowed_hosts=allowed, auth="on", auth_force_open=False
    )
    assert host_allowed(header, settings) is ok
    assert host_name("[::1]:80") == "::1"


# --- settings --------------------------------------------------------------------------------


def test_auth_mode_follows_the_bind_address() -> None:
    assert Settings(api_host="127.0.0.1").auth_mode() == "open"
    assert Settings(api_host="localhost").auth_mode() == "open"
    assert Settings(api_host="0.0.0.0").auth_mode() == "on"
    assert Settings(api_host="127.0.0.1", auth="on").auth_mode() == "on"


def test_open_mode_on_an_exposed_address_is_refused_unless_forced() -> None:
    with pytest.raises(ValidationError, match="FLORIST_AUTH_FORCE_OPEN"):
        Settings(api_host="0.0.0.0", auth="open")
    forced = Settings(api_host="0.0.0.0", auth="open", auth_force_open=True)
    assert forced.auth_mode() == "open"


@pytest.mark.parametrize("password", ["change-me", "changeme", "password", "florist", "EXAMPLE"])
def test_placeholder_passwords_are_refused_outside_local_mode(password: str) -> None:
    url = f"postgresql://florist:{password}@db:5432/florist"

    with pytest.raises(ValidationError, match="placeholder") as refused:
        Settings(api_host="0.0.0.0", database_url=url)

    assert f":{password}@" not in str(refused.value)  # neither the URL nor its password
    assert "db:5432" not in str(refused.value)
    assert Settings(api_host="127.0.0.1", database_url=url).database_url == url  # local
    real = url.replace(password, "x7Vq-2mL9pRz")
    assert Settings(api_host="0.0.0.0", database_url=real).database_url == real


def test_lists_come_comma_separated_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLORIST_ALLOWED_HOSTS", "a.example, b.example")
    monkeypatch.setenv("FLORIST_CORS_ORIGINS", "https://x.example")
    monkeypatch.setenv("FLORIST_TOKEN", "florist_abc_def")

    settings = Settings()

    assert settings.allowed_hosts == ["a.example", "b.example"]
    assert settings.cors_origins == ["https://x.example"]
    assert "florist_abc_def" not in repr(settings)  # a SecretStr


def test_create_app_refuses_settings_made_unsafe_after_reading(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    settings.api_host = "0.0.0.0"  # what `florist api --host 0.0.0.0` does
    settings.auth = "open"
    with pytest.raises(ValueError, match="not a loopback address"):
        create_app(settings, follow_runs=False)


# --- FLORIST_ADMIN_TOKEN: a deployment's first token, from its secret store -------------------


def test_the_admin_token_setting_is_registered_once_and_revocation_holds(
    tmp_path: Path, migrated_url: str
) -> None:
    token = generate_token()
    token_id = token.split("_")[1]

    with _app(tmp_path, migrated_url, auth="on", admin_token=token) as client:
        admin = client.get("/api/v1/node-keys", headers=bearer(token))
        sessions = client.app.state.sessions  # type: ignore[attr-defined]
        with sessions() as db:
            revoke_token(db, token_id)
            db.commit()
    # A restart with the same secret finds the id and leaves the revocation in place.
    with _app(tmp_path, migrated_url, auth="on", admin_token=token) as client:
        after_restart = client.get("/api/v1/node-keys", headers=bearer(token))
        sessions = client.app.state.sessions  # type: ignore[attr-defined]
        with sessions() as db:
            rows = db.query(ApiToken).all()

    assert admin.status_code == 200
    assert after_restart.status_code == 401
    assert [(r.id, r.name, r.role) for r in rows] == [(token_id, "admin-token", "admin")]
    assert rows[0].secret_sha256 == hashlib.sha256(token.split("_", 2)[2].encode()).hexdigest()


def test_an_admin_token_whose_id_is_known_with_another_secret_stops_the_start(
    tmp_path: Path, migrated_url: str
) -> None:
    token = generate_token()
    impostor = token.rsplit("_", 1)[0] + "_" + generate_token().split("_", 2)[2]
    with _app(tmp_path, migrated_url, auth="on", admin_token=token):
        pass

    with (
        pytest.raises(TokenConflict, match="registered with another secret"),
        _app(tmp_path, migrated_url, auth="on", admin_token=impostor),
    ):
        pass


@pytest.mark.parametrize(
    "bad", ["hunter2", "florist_XYZ_secretsecretsecretsecret", "florist_0123456789ab_short"]
)
def test_a_malformed_admin_token_is_refused_without_echoing_it(bad: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(admin_token=bad)  # type: ignore[arg-type]
    assert "florist token generate" in str(caught.value)
    assert bad not in str(caught.value)


def test_florist_token_generate_prints_a_token_it_does_not_store(
    migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLORIST_DATABASE_URL", migrated_url)
    monkeypatch.setenv("FLORIST_HOME", str(tmp_path))
    runner = CliRunner()

    first = runner.invoke(cli.app, ["token", "generate"])
    second = runner.invoke(cli.app, ["token", "generate"])
    listed = runner.invoke(cli.app, ["token", "list"])

    assert first.exit_code == 0, first.output
    assert Settings(admin_token=first.stdout.strip()).admin_token  # type: ignore[arg-type]
    assert first.stdout != second.stdout
    assert "no tokens" in listed.stdout


# --- florist token ---------------------------------------------------------------------------


def test_florist_token_create_list_revoke(
    migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLORIST_DATABASE_URL", migrated_url)
    monkeypatch.setenv("FLORIST_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")  # rich's error box: the message on one line
    runner = CliRunner()

    made = runner.invoke(cli.app, ["token", "create", "--role", "operator", "--name", "ci"])
    bad = runner.invoke(cli.app, ["token", "create", "--role", "root", "--name", "x"])

    assert made.exit_code == 0, made.output
    token = made.stdout.strip().splitlines()[-1]
    token_id = token.split("_")[1]
    assert token.startswith("florist_") and len(token) > 50
    assert bad.exit_code == 2 and "known: reader, operator, admin" in bad.output
    listed = runner.invoke(cli.app, ["token", "list"])
    assert token_id in listed.stdout and "operator" in listed.stdout
    assert token.split("_", 2)[2] not in listed.stdout
    revoked = runner.invoke(cli.app, ["token", "revoke", token_id])
    assert revoked.exit_code == 0 and "revoked" in revoked.stdout
    assert runner.invoke(cli.app, ["token", "revoke", "nosuchtoken0"]).exit_code == 1
