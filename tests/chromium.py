"""Debian's headless Chromium for the browser tests: where it is and how it is started."""

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
# As root in a sandbox with no network but loopback: no sandbox, and no background connections
# (refused here, many at a time).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
