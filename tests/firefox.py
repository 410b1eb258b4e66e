"""Headless Firefox ESR driven over WebDriver BiDi, the protocol Firefox speaks natively.

Playwright drives Chromium here; it cannot drive Debian's Firefox, and geckodriver is not
packaged, so this small client talks BiDi to `firefox-esr --remote-debugging-port` directly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

from florist.server.processes import free_port

FIREFOX = Path("/usr/bin/firefox-esr")


class BiDiError(RuntimeError):
    pass


class Firefox:
    """One headless Firefox with one tab; JavaScript errors and console errors are collected."""

    def __init__(self, start_timeout: float = 30.0) -> None:
        self.profile = tempfile.mkdtemp(prefix="florist-firefox-")
        port = free_port()
        self.proc = subprocess.Popen(
            [
                str(FIREFOX),
                "--headless",
                "--no-remote",
                "--profile",
                self.profile,
                "--remote-debugging-port",
                str(port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.ws = self._connect(f"ws://127.0.0.1:{port}/session", start_timeout)
        self._next_id = 0
        self.errors: list[str] = []
        self.command("session.new", {"capabilities": {}})
        self.command("session.subscribe", {"events": ["log.entryAdded"]})
        self.context = self.command("browsingContext.create", {"type": "tab"})["context"]

    def _connect(self, url: str, timeout: float) -> ClientConnection:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return connect(url, max_size=None, open_timeout=5)
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise
                time.sleep(0.2)

    def command(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._next_id += 1
        self.ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("type") == "event":
                entry = message.get("params", {})
                if entry.get("level") == "error":
                    self.errors.append(str(entry.get("text")))
                continue
            if message.get("id") == self._next_id:
                if message.get("type") == "error":
                    raise BiDiError(f"{method}: {message.get('error')}: {message.get('message')}")
                return dict(message["result"])

    def goto(self, url: str) -> None:
        self.command(
            "browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"}
        )

    def evaluate(self, expression: str) -> Any:
        result = self.command(
            "script.evaluate",
            {"expression": expression, "target": {"context": self.context}, "awaitPromise": True},
        )
        if result.get("type") == "exception":
            raise BiDiError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Poll ``expression`` until it is truthy; its last value in the failure message."""
        deadline = time.monotonic() + timeout
        while True:
            # A page still loading throws (its element is not there yet): that is "not yet".
            try:
                value = self.evaluate(expression)
            except BiDiError as exc:
                value = exc
            if value and not isinstance(value, BiDiError):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{expression!r} still {value!r} after {timeout} s")
            time.sleep(0.1)

    def close(self) -> None:
        try:
            if hasattr(self, "ws"):
                self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)
