"""The simulation SuperLink under a guard: its runs' ``flwr-simulation`` processes end with it.

Flower's executor starts each simulation run's ``flwr-simulation`` in a session of its own,
watching a parent that outlives the SuperLink; and a simulation needs nothing from the SuperLink
once started (its ServerApp talks to an in-memory Grid). So a SuperLink that is stopped or dies
leaves its runs going, with Ray under them, still recording rounds, while the run follower,
finding the run gone, submits the experiment again. This wrapper runs ``flower-superlink``,
passes signals on, and when it exits ends every ``flwr-simulation`` attached to its runtime API
address (Ray's processes go with their driver).

    python -m florist.server.simulation_link flower-superlink ... --simulation
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence


def runtime_address(command: Sequence[str]) -> str:
    """``host:port`` of the SuperLink's HTTP APIs (Control and runtime) on its command line."""
    args = list(command)
    host = args[args.index("--host") + 1] if "--host" in args else "127.0.0.1"
    port = args[args.index("--port") + 1] if "--port" in args else "8000"
    return f"{host}:{port}"


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def simulation_processes(address: str) -> list[int]:
    """Every ``flwr-simulation`` process attached to the runtime API at ``address``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        args = _cmdline(int(entry))
        if not any(arg.endswith("flwr-simulation") for arg in args[:2]):
            continue
        if "--runtime-api-address" in args:
            at = args.index("--runtime-api-address") + 1
            if at < len(args) and args[at] == address:
                found.append(int(entry))
    return found


def end_runs(address: str, grace_s: float = 5.0) -> list[int]:
    """SIGTERM the runs at ``address`` (Flower's handler ends the run and Ray), then SIGKILL
    what is left after ``grace_s``; returns the pids it signalled."""
    pids = simulation_processes(address)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and simulation_processes(address):
        time.sleep(0.2)
    for pid in simulation_processes(address):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def main(argv: Sequence[str] | None = None) -> int:
    command = list(sys.argv[1:] if argv is None else argv)
    if not command:
        print("usage: python -m florist.server.simulation_link COMMAND...", file=sys.stderr)
        return 2
    link = subprocess.Popen(command)

    def forward(signum: int, _frame: object) -> None:
        link.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = link.wait()
    end_runs(runtime_address(command))
    return code


if __name__ == "__main__":
    sys.exit(main())
