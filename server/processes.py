"""Starting Flower's own processes (SuperLink, SuperNodes) and keeping them alive."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from florist.server.settings import Settings

from florist.server.settings import is_loopback

log = logging.getLogger(__name__)


def _tool(name: str) -> str:
    """A console script of this environment (next to the interpreter), else one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment Flower's processes get: their own FLWR_HOME, no telemetry."""
    env = dict(os.environ)
    # Flower's processes start their helpers (flower-superexec, flwr-serverapp) by name.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env.update({"FLWR_HOME": str(home / "flwr"), "FLWR_TELEMETRY_ENABLED": "0"})
    env.update(extra or {})
    return env


class InsecureTransportError(RuntimeError):
    """Plain text was asked for on an address other than loopback, and not forced."""


@dataclass(frozen=True)
class ServerTls:
    """The SuperLink's TLS files (``florist certs``): the CA, the server certificate and key."""

    ca_cert: Path
    cert: Path
    key: Path

    def missing(self) -> list[Path]:
        return [p for p in (self.ca_cert, self.cert, self.key) if not p.is_file()]

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerTls | None:
        """The files the settings name; None in plain text. A missing file is an error here,
        not a SuperLink that exits with Flower's less specific complaint."""
        if settings.insecure:
            return None
        ca, cert, key = (settings.tls_file(w) for w in ("ca", "cert", "key"))
        if ca is None or cert is None or key is None:
            raise FileNotFoundError(
                "TLS needs a CA, a certificate and a key: set FLORIST_TLS_DIR (`florist certs`) "
                "or FLORIST_TLS_CA_CERT, FLORIST_TLS_CERT and FLORIST_TLS_KEY"
            )
        tls = cls(ca, cert, key)
        if missing := tls.missing():
            raise FileNotFoundError(f"TLS files missing: {', '.join(map(str, missing))}")
        return tls


def tls_env(settings: Settings) -> dict[str, str]:
    """The transport settings as FLORIST_* variables, for the processes Florist starts (the API
    must reach a TLS SuperLink the way this process was told to)."""
    env = {
        "FLORIST_SUPERNODE_AUTH": "1" if settings.supernode_auth else "0",
        "FLORIST_FORCE_INSECURE": "1" if settings.force_insecure else "0",
    }
    if not settings.insecure:
        files = {"CA_CERT": settings.tls_file("ca"), "CERT": settings.tls_file("cert")}
        files["KEY"] = settings.tls_file("key")
        env |= {f"FLORIST_TLS_{name}": str(path) for name, path in files.items() if path}
    return env


def check_plaintext(addresses: Mapping[str, str], *, force: bool = False) -> None:
    """Refuse plain text on any of ``addresses`` (``what -> host:port``) but loopback.

    With ``force`` it goes ahead, with a warning no one can miss: anyone on the path reads
    the models and the updates, and on an open Fleet API anyone can join as a SuperNode.
    """
    exposed = {what: a for what, a in addresses.items() if not is_loopback(a.rsplit(":", 1)[0])}
    if not exposed:
        return
    where = ", ".join(f"{what} on {address}" for what, address in exposed.items())
    if not force:
        raise InsecureTransportError(
            f"plain text refused on {where}: not loopback. Make certificates (`florist certs "
            "--hosts ...`) and set FLORIST_TLS_DIR, or set FLORIST_FORCE_INSECURE=1 on a "
            "network you trust"
        )
    log.warning(
        "\n%s\nINSECURE: plain text (no TLS) on %s, forced by FLORIST_FORCE_INSECURE.\n"
        "Anyone on the network can read and alter models and updates.\n%s",
        "!" * 78,
        where,
        "!" * 78,
    )


def superlink_command(
    *,
    control: str = "127.0.0.1:8000",
    fleet: str = "127.0.0.1:9092",
    health: str | None = None,
    database: Path | None = None,
    tls: ServerTls | None = None,
    supernode_auth: bool = False,
    force_insecure: bool = False,
) -> list[str]:
    """``flower-superlink``: with ``tls`` its Fleet, Control and ServerApp-side APIs speak TLS
    (the ServerApp's runtime verifies them with the same CA); ``supernode_auth`` admits only
    registered SuperNode keys. Without ``tls``, plain text is refused off loopback unless forced."""
    if supernode_auth and tls is None:
        raise ValueError("SuperNode authentication needs TLS (Flower refuses it in plain text)")
    if tls is None:
        check_plaintext({"Control API": control, "Fleet API": fleet}, force=force_insecure)
    host, port = control.rsplit(":", 1)
    # A state file: Flower's SuperLink behind server/superlink.py, which queues its SQLite
    # transactions in-process (the file's lock would make writers sleep in SQLite's busy loop).
    launcher = (
        [sys.executable, "-m", "florist.server.superlink"]
        if database is not None
        else [_tool("flower-superlink")]
    )
    cmd = [
        *launcher,
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        port,
        "--fleet-api-type",
        "grpc-rere",
        "--fleet-api-address",
        fleet,
    ]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += [
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.cert),
            "--ssl-keyfile",
            str(tls.key),
        ]
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    if health:
        cmd += ["--health-server-address", health]
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def supernode_command(
    *,
    superlink: str,
    clientappio: str,
    node_config: Mapping[str, int | float | str],
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    force_insecure: bool = False,
    isolation: str = "subprocess",
    tuned: bool = False,
) -> list[str]:
    """``flower-supernode``; ``isolation="process"`` leaves ClientApps to a warm executor
    (``executor_command``), ``tuned`` starts it through florist.client.supernode (short polls).

    ``root_certificates``: the CA that signed the SuperLink's certificate (TLS; without it
    plain text, refused to a SuperLink off loopback unless forced); ``auth_key``: the node's
    private key for a SuperLink with SuperNode authentication.
    """
    if isolation not in ("subprocess", "process"):
        raise ValueError(f"isolation must be 'subprocess' or 'process', got {isolation!r}")
    if root_certificates is None:
        check_plaintext({"the SuperLink's Fleet API": superlink}, force=force_insecure)
    host, port = clientappio.rsplit(":", 1)
    config = " ".join(
        f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in node_config.items()
    )
    launcher = (
        [sys.executable, "-m", "florist.client.supernode"] if tuned else [_tool("flower-supernode")]
    )
    cmd = [
        *launcher,
        "--grpc-rere",
        "--superlink",
        superlink,
        "--host",
        host,
        "--port",
        port,
        "--node-config",
        config,
    ]
    if root_certificates is None:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    if isolation != "subprocess":
        cmd += ["--isolation", isolation]
    return cmd


def executor_command(*, clientappio: str | Sequence[str]) -> list[str]:
    """Florist's warm ClientApp executor for the SuperNode whose ClientApp-side API is given;
    several addresses: one pool process forking an executor for each (client/executor.py).

    Plain text: that API is the SuperNode's own, on loopback (``florist client`` binds it to
    127.0.0.1), and Flower serves it without TLS unless given server certificates of its own.
    """
    addresses = [clientappio] if isinstance(clientappio, str) else list(clientappio)
    cmd = [sys.executable, "-m", "florist.client.executor"]
    for address in addresses:
        cmd += ["--clientappio", address]
    return [*cmd, "--insecure"]


def supernode_processes(
    name: str,
    *,
    superlink: str,
    clientappio: str,
    node_config: Mapping[str, int | float | str],
    env: Mapping[str, str],
    log_dir: Path,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    force_insecure: bool = False,
    restart: bool = True,
    executor: bool = True,
    executors_on_host: int = 1,
) -> list[Managed]:
    """A SuperNode with short polls and its warm executor, to ``Supervisor.add`` in this order
    (``executor=False``: the SuperNode alone, for a shared pool from ``executor_pool``).

    The executor is always restartable: a dead one leaves its SuperNode with no one to run
    ClientApps (its claimed task fails after the token expires, the next ones wait).
    ``executors_on_host``: how many executors this machine runs; they share its cores
    (``FLORIST_EXECUTOR_THREADS``, unless the environment sets it already).
    """
    node = supernode_command(
        superlink=superlink,
        clientappio=clientappio,
        node_config=node_config,
        root_certificates=root_certificates,
        auth_key=auth_key,
        force_insecure=force_insecure,
        isolation="process",
        tuned=True,
    )
    supernode = Managed(name, node, env, log_dir / f"{name}.log", restart=restart)
    if not executor:
        return [supernode]
    executor_env = dict(env)
    if executors_on_host > 1:
        from florist.client.executor import THREADS_ENV, torch_threads

        threads = torch_threads(executor_env, executors_on_host, os.cpu_count())
        executor_env[THREADS_ENV] = str(threads)
    return [
        supernode,
        Managed(
            f"{name}-executor",
            executor_command(clientappio=clientappio),
            executor_env,
            log_dir / f"{name}-executor.log",
            restart=True,
        ),
    ]


def executor_pool(clientappios: Sequence[str], *, env: Mapping[str, str], log_dir: Path) -> Managed:
    """One process serving the ClientApps of several SuperNodes on this machine: it imports
    torch and the app once and forks an executor per SuperNode, which then share those pages."""
    return Managed(
        "executors",
        executor_command(clientappio=clientappios),
        env,
        log_dir / "executors.log",
        restart=True,
    )


def wait_for_port(address: str, timeout: float = 30.0) -> None:
    """Block until something accepts TCP connections at host:port."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {address} after {timeout:.0f} s") from exc
            time.sleep(0.2)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Managed:
    """One supervised process: its command, where its output goes, how often it restarted.

    ``log_path=None`` leaves the child on the supervisor's own stdout/stderr (in a container,
    where the runtime collects them; a file inside it would be invisible to `docker logs`).
    """

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log_path: Path | None
    restart: bool = True
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    last_start: float = 0.0
    _log: object = field(default=None, repr=False)

    def start(self) -> None:
        log_file = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            self._log = log_file
        # A new session so Ctrl-C in the terminal reaches the supervisor only, which then
        # stops the children in order. Without a file the child inherits our stdout/stderr.
        self.proc = subprocess.Popen(
            list(self.argv),
            env=dict(self.env),
            stdout=log_file,
            stderr=subprocess.STDOUT if log_file is not None else None,
            start_new_session=True,
        )
        self.last_start = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None


class Supervisor:
    """Starts processes in order, restarts one that dies (with back-off), stops all in reverse."""

    def __init__(self, max_restarts: int = 5, *, log_to_stdout: bool = False) -> None:
        self.processes: list[Managed] = []
        self.max_restarts = max_restarts
        # One switch for every child (FLORIST_LOG_TO_STDOUT) rather than a flag per call site.
        self.log_to_stdout = log_to_stdout

    def add(self, managed: Managed) -> Managed:
        if self.log_to_stdout:
            managed.log_path = None
        managed.start()
        self.processes.append(managed)
        log.info(
            "started %s (pid %s), log %s",
            managed.name,
            managed.proc and managed.proc.pid,
            managed.log_path or "to stdout",
        )
        return managed

    def check(self) -> list[str]:
        """Restart what died; returns a line per event, for the operator."""
        events = []
        for m in self.processes:
            if m.alive() or m.proc is None:
                continue
            code = m.proc.returncode
            if not m.restart or m.restarts >= self.max_restarts:
                if m.restart:
                    events.append(
                        f"{m.name} exited ({code}); giving up after {m.restarts} restarts"
                    )
                    m.restart = False
                continue
            # Back off so a process that dies at once does not spin.
            if time.monotonic() - m.last_start < min(2.0**m.restarts, 30.0):
                continue
            m.restarts += 1
            events.append(f"{m.name} exited ({code}); restarting ({m.restarts})")
            m.start()
        return events

    def stop_all(self) -> None:
        for m in reversed(self.processes):
            m.stop()
