"""Transport: TLS wired into every command, plain text refused off loopback unless forced."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from florist.server import cli
from florist.server.certs import make_certs
from florist.server.cli import app
from florist.server.processes import (
    InsecureTransportError,
    ServerTls,
    check_plaintext,
    is_loopback,
    superlink_command,
    supernode_command,
    supernode_processes,
    tls_env,
)
from florist.server.settings import Settings


@pytest.fixture
def tls(tmp_path: Path) -> ServerTls:
    paths = make_certs(tmp_path / "certs", ["localhost", "127.0.0.1"])
    return ServerTls(paths.ca_cert, paths.server_cert, paths.server_key)


def test_loopback_is_localhost_127_8_and_ipv6_one() -> None:
    for host in ("localhost", "127.0.0.1", "127.3.2.1", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.5", "superlink", "example.org", "128.0.0.1"):
        assert not is_loopback(host), host


def test_plain_text_is_refused_off_loopback(caplog: pytest.LogCaptureFixture) -> None:
    check_plaintext({"Fleet API": "127.0.0.1:9092", "Control API": "localhost:8000"})
    with pytest.raises(InsecureTransportError, match=r"Fleet API on 0\.0\.0\.0:9092"):
        check_plaintext({"Control API": "127.0.0.1:8000", "Fleet API": "0.0.0.0:9092"})
    with pytest.raises(InsecureTransportError, match="FLORIST_FORCE_INSECURE"):
        check_plaintext({"the API": "10.1.2.3:8080"})
    with caplog.at_level(logging.WARNING, logger="florist.server.processes"):
        check_plaintext({"the API": "10.1.2.3:8080"}, force=True)
    assert "INSECURE" in caplog.text and "10.1.2.3:8080" in caplog.text


def test_superlink_command_with_tls_and_auth(tls: ServerTls) -> None:
    cmd = superlink_command(
        control="0.0.0.0:8000", fleet="0.0.0.0:9092", tls=tls, supernode_auth=True
    )
    flags = dict(itertools.pairwise(cmd))
    assert flags["--ssl-ca-certfile"] == str(tls.ca_cert)
    assert flags["--ssl-certfile"] == str(tls.cert)
    assert flags["--ssl-keyfile"] == str(tls.key)
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    # Plain text: loopback only, or forced; never with SuperNode authentication.
    assert "--insecure" in superlink_command(control="127.0.0.1:8000", fleet="127.0.0.1:9092")
    with pytest.raises(InsecureTransportError):
        superlink_command(control="127.0.0.1:8000", fleet="0.0.0.0:9092")
    forced = superlink_command(control="0.0.0.0:8000", fleet="0.0.0.0:9092", force_insecure=True)
    assert "--insecure" in forced and "--ssl-certfile" not in forced
    with pytest.raises(ValueError, match="needs TLS"):
        superlink_command(supernode_auth=True)


def test_supernode_command_verifies_the_superlink_with_the_ca(tls: ServerTls) -> None:
    key = Path("/keys/site-a")
    cmd = supernode_command(
        superlink="server.lan:9092",
        clientappio="127.0.0.1:9100",
        node_config={},
        root_certificates=tls.ca_cert,
        auth_key=key,
    )
    flags = dict(itertools.pairwise(cmd))
    assert flags["--root-certificates"] == str(tls.ca_cert)
    assert flags["--auth-supernode-private-key"] == str(key)
    assert "--insecure" not in cmd
    with pytest.raises(InsecureTransportError, match=r"server\.lan:9092"):
        supernode_command(superlink="server.lan:9092", clientappio="127.0.0.1:1", node_config={})
    # The warm executor talks to its own SuperNode on loopback: plain, whatever the link is.
    node, executor = supernode_processes(
        "n",
        superlink="server.lan:9092",
        clientappio="127.0.0.1:9100",
        node_config={},
        env={},
        log_dir=Path("/tmp"),
        root_certificates=tls.ca_cert,
    )
    assert "--root-certificates" in node.argv and "--insecure" not in node.argv
    assert list(node.argv[-2:]) == ["--isolation", "process"]
    assert executor.argv[-1] == "--insecure" and "127.0.0.1:9100" in executor.argv


def test_tls_files_switch_tls_on_and_contradictions_are_refused(tmp_path: Path) -> None:
    assert Settings().insecure
    on = Settings(tls_dir=tmp_path)
    assert not on.insecure
    assert on.tls_file("ca") == (tmp_path / "ca.crt").resolve()
    assert on.tls_file("key") == (tmp_path / "server.key").resolve()
    own = Settings(tls_dir=tmp_path, tls_cert=tmp_path / "mine.pem")
    assert own.tls_file("cert") == (tmp_path / "mine.pem").resolve()
    client = Settings(tls_ca_cert=tmp_path / "ca.crt")
    assert not client.insecure and client.tls_file("cert") is None
    # compose hands unset variables over as empty strings: not a path.
    assert Settings(tls_dir="", tls_ca_cert=" ").insecure  # type: ignore[arg-type]
    for bad, message in [
        ({"tls_dir": tmp_path, "insecure": True}, "contradicts"),
        ({"insecure": False}, "needs certificates"),
        ({"supernode_auth": True}, "needs TLS"),
    ]:
        with pytest.raises(ValidationError, match=message):
            Settings(**bad)


def test_server_tls_from_settings_names_missing_files(tmp_path: Path, tls: ServerTls) -> None:
    assert ServerTls.from_settings(Settings()) is None
    assert ServerTls.from_settings(Settings(tls_dir=tls.ca_cert.parent)) == ServerTls(
        tls.ca_cert.resolve(), tls.cert.resolve(), tls.key.resolve()
    )
    with pytest.raises(FileNotFoundError, match=r"server\.key"):
        ServerTls.from_settings(Settings(tls_dir=tmp_path))
    with pytest.raises(FileNotFoundError, match="a CA, a certificate and a key"):
        ServerTls.from_settings(Settings(tls_ca_cert=tls.ca_cert))
    env = tls_env(Settings(tls_dir=tls.ca_cert.parent, supernode_auth=True))
    assert env["FLORIST_TLS_CA_CERT"] == str(tls.ca_cert.resolve())
    assert env["FLORIST_SUPERNODE_AUTH"] == "1" and env["FLORIST_FORCE_INSECURE"] == "0"
    # The environment the API process gets builds the same settings again.
    again = Settings(**{k[len("FLORIST_") :].lower(): v for k, v in env.items()})
    assert again.tls_file("key") == tls.key.resolve() and again.supernode_auth


def _exec_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Each exec's argv; like a real exec, it does not return (the command goes no further)."""
    calls: list[list[str]] = []

    def execvpe(file: str, argv: list[str], env: dict[str, str]) -> None:
        calls.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(cli.os, "execvpe", execvpe)
    return calls


def test_florist_superlink_refuses_plain_text_on_every_interface(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tls: ServerTls
) -> None:
    calls = _exec_calls(monkeypatch)
    monkeypatch.setenv("FLORIST_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLORIST_SUPERLINK_FLEET", "0.0.0.0:9092")
    refused = CliRunner().invoke(app, ["superlink"])
    assert refused.exit_code != 0 and calls == []
    assert isinstance(refused.exception, InsecureTransportError)

    monkeypatch.setenv("FLORIST_TLS_DIR", str(tls.ca_cert.parent))
    monkeypatch.setenv("FLORIST_SUPERNODE_AUTH", "true")
    result = CliRunner().invoke(app, ["superlink"])
    assert result.exit_code == 0, result.output
    [argv] = calls
    assert "--enable-supernode-auth" in argv and "--ssl-certfile" in argv


def test_florist_client_passes_the_ca_and_its_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tls: ServerTls
) -> None:
    calls = _exec_calls(monkeypatch)
    monkeypatch.setenv("FLORIST_HOME", str(tmp_path / "home"))
    key = tmp_path / "node"
    key.write_text("not read here")
    args = ["client", "--no-warm", "--partition-id", "0", "--num-partitions", "2"]
    result = CliRunner().invoke(
        app,
        [
            *args,
            "--superlink",
            "server.lan:9092",
            "--root-certificates",
            str(tls.ca_cert),
            "--auth-key",
            str(key),
        ],
    )
    assert result.exit_code == 0, result.output
    flags = dict(itertools.pairwise(calls[0]))
    assert flags["--root-certificates"] == str(tls.ca_cert.resolve())
    assert flags["--auth-supernode-private-key"] == str(key.resolve())
    # Without a CA, plain text to a SuperLink on another machine is refused.
    plain = CliRunner().invoke(app, [*args, "--superlink", "server.lan:9092"])
    assert isinstance(plain.exception, InsecureTransportError) and len(calls) == 1


def test_api_serves_https_off_loopback_and_refuses_plain_text_there(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tls: ServerTls
) -> None:
    import uvicorn

    runs: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: runs.append(kw))
    monkeypatch.setenv("FLORIST_HOME", str(tmp_path / "home"))
    refused = CliRunner().invoke(app, ["api", "--host", "0.0.0.0"])
    assert isinstance(refused.exception, InsecureTransportError) and runs == []
    assert CliRunner().invoke(app, ["api"]).exit_code == 0  # loopback: plain HTTP is fine
    assert runs[-1]["ssl_certfile"] is None

    monkeypatch.setenv("FLORIST_TLS_DIR", str(tls.ca_cert.parent))
    result = CliRunner().invoke(app, ["api", "--host", "0.0.0.0"])
    assert result.exit_code == 0, result.output
    assert runs[-1]["ssl_certfile"] == str(tls.cert.resolve())
    assert runs[-1]["ssl_keyfile"] == str(tls.key.resolve())
    settings = Settings(tls_dir=tls.ca_cert.parent, api_host="10.0.0.5")
    assert cli.api_url(settings) == "https://10.0.0.5:8080"
