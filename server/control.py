"""Starting, following and stopping runs on the SuperLink through Flower's Control API client."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx
from flwr.cli.build import build_fab_from_disk
from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
from flwr.cli.config_utils import get_fab_metadata
from flwr.common.serde import fab_to_proto, run_from_proto, user_config_to_proto
from flwr.proto.control_pb2 import (
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
    StreamLogsRequest,
    UnregisterNodeRequest,
)
from flwr.proto.federation_config_pb2 import SimulationConfig
from flwr.proto.node_pb2 import NodeInfo
from flwr.proto.run_pb2 import Run as RunProto
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.fab import Fab
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

from florist.server.settings import Settings


def app_dir() -> Path:
    """The Flower app folder shipped in the package (its pyproject names florist's apps)."""
    return Path(str(files("florist.server") / "flwr_app"))


@lru_cache(maxsize=1)
def app_fab() -> Fab:
    """The app's FAB, built once per process with Flower's own builder."""
    fab_bytes = build_fab_from_disk(app_dir())
    return Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})


@lru_cache(maxsize=1)
def app_fab_id() -> str:
    """The FAB id (``publisher/name``) of Florist's own app: runs of it are never external."""
    return get_fab_metadata(app_fab().content)[0]


@dataclass(frozen=True)
class RunState:
    """A run as the SuperLink reports it: ``status`` pending|starting|running|finished.

    The app (``fab_id``, ``fab_version``), its run-config overrides and the times are filled
    where the SuperLink said them (``ListRuns``), for naming runs Florist did not start.
    """

    run_id: int
    status: str
    sub_status: str
    details: str
    fab_id: str = ""
    fab_version: str = ""
    override_config: Mapping[str, bool | int | float | str] = field(default_factory=dict)
    pending_at: datetime | None = None
    running_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @classmethod
    def from_proto(cls, proto: RunProto) -> RunState:
        run = run_from_proto(proto)
        return cls(
            run_id=int(run.run_id),
            status=run.status.status,
            sub_status=run.status.sub_status,
            details=run.status.details,
            fab_id=run.fab_id,
            fab_version=run.fab_version,
            override_config=dict(run.override_config),
            pending_at=_parse_time(run.pending_at),
            running_at=_parse_time(run.running_at),
            finished_at=_parse_time(run.finished_at),
        )


@dataclass(frozen=True)
class SuperLinkNode:
    """A SuperNode as the SuperLink lists it (Control API ``ListNodes``, ``flwr supernode ls``).

    ``status`` is Flower's: ``online`` (heartbeating), ``offline`` (its heartbeat lapsed),
    ``registered`` (registered, never connected) or ``unregistered`` (it left, or was removed).
    """

    node_id: int
    status: str
    registered_at: datetime | None
    last_activated_at: datetime | None
    last_deactivated_at: datetime | None
    unregistered_at: datetime | None
    online_until: datetime | None
    heartbeat_interval_s: float
    # The key it authenticates with (PEM SubjectPublicKeyInfo): a registered key's, or the one
    # an unauthenticated SuperNode made up for itself.
    public_key: bytes = b""

    @property
    def online(self) -> bool:
        return self.status == "online"

    @classmethod
    def from_proto(cls, info: NodeInfo) -> SuperLinkNode:
        return cls(
            node_id=int(info.node_id),
            status=info.status,
            # An optional timestamp is an empty string until its event happens.
            registered_at=_parse_time(info.registered_at),
            last_activated_at=_parse_time(info.last_activated_at),
            last_deactivated_at=_parse_time(info.last_deactivated_at),
            unregistered_at=_parse_time(info.unregistered_at),
            online_until=datetime.fromtimestamp(info.online_until, UTC)
            if info.HasField("online_until")
            else None,
            heartbeat_interval_s=float(info.heartbeat_interval),
            public_key=bytes(info.public_key),
        )


def _error_detail(response: Any) -> str:
    """The message of a Control API error answer (JSON with a message, else its text)."""
    try:
        body = response.json()
    except ValueError:
        return str(response.text)[:500] or response.reason_phrase
    if isinstance(body, dict):
        for key in ("message", "detail", "error", "public_details"):
            if isinstance(body.get(key), str) and body[key]:
                return str(body[key])
    return str(body)[:500]


def _parse_time(text: str) -> datetime | None:
    """One of Flower's ISO 8601 timestamps as timezone-aware UTC; None for an empty one."""
    if not text:
        return None
    value = datetime.fromisoformat(text)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class SuperLinkUnavailable(ConnectionError):
    """The SuperLink's Control API cannot be reached."""


class SuperLinkRefused(RuntimeError):
    """The SuperLink answered and refused the request (``detail`` says why, in its words)."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"the SuperLink refused ({status_code}): {detail}")
        self.status_code = status_code
        self.detail = detail


class ControlClient:
    """A thin, typed face on ``flwr``'s ControlHttpClient for the calls Florist makes."""

    def __init__(
        self,
        address: str,
        *,
        insecure: bool = True,
        root_certificates: bytes | str | None = None,
    ):
        self.address = address
        self._client = ControlHttpClient.from_server_address(
            server_address=address,
            insecure=insecure,
            root_certificates=root_certificates,
            interceptors=[
                CliClientHttpInterceptor(),
                RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
            ],
        )

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._client, method)(request)
        except OSError as exc:
            raise SuperLinkUnavailable(f"SuperLink at {self.address}: {exc}") from exc
        except Exception as exc:
            # httpx raises its own transport errors; keep a single error type for callers.
            if type(exc).__module__.startswith("httpx"):
                raise SuperLinkUnavailable(f"SuperLink at {self.address}: {exc}") from exc
            raise

    @classmethod
    def from_settings(cls, settings: Settings) -> ControlClient:
        """The client the settings describe: HTTPS verified with their CA when TLS is on."""
        ca = settings.tls_file("ca")
        if settings.insecure or ca is None:
            return cls(settings.superlink_control, insecure=True)
        return cls(settings.superlink_control, insecure=False, root_certificates=ca.read_bytes())

    def start_run(
        self,
        run_config: dict[str, int | float | str | bool],
        federation: SimulationConfig | None = None,
    ) -> int:
        """Submit florist's app with ``run_config``; returns Flower's run id. ``federation``:
        a simulation SuperLink's per-run settings (server/simulation.py)."""
        request = StartRunRequest(
            fab=fab_to_proto(app_fab()), override_config=user_config_to_proto(run_config)
        )
        if federation is not None:
            request.override_federation_config.CopyFrom(federation)
        response = self._call("StartRun", request)
        if not response.HasField("run_id"):
            raise RuntimeError(f"SuperLink refused the run: {response.note or 'no reason given'}")
        return int(response.run_id)

    def run_state(self, run_id: int) -> RunState | None:
        response = self._call("ListRuns", ListRunsRequest(run_id=run_id))
        run = response.run_dict.get(run_id)
        return None if run is None else RunState.from_proto(run)

    def list_runs(self) -> list[RunState]:
        """Every run the SuperLink knows (``flwr ls``), whoever started it."""
        response = self._call("ListRuns", ListRunsRequest())
        return [RunState.from_proto(run) for run in response.run_dict.values()]

    def stop_run(self, run_id: int) -> bool:
        return bool(self._call("StopRun", StopRunRequest(run_id=run_id)).success)

    def list_nodes(self) -> Sequence[SuperLinkNode]:
        """Every SuperNode the SuperLink knows for this account, departed ones included.

        Without account authentication (Florist's default) that is every node: the SuperLink
        files all of them under its one no-auth account.
        """
        response = self._call("ListNodes", ListNodesRequest())
        return [SuperLinkNode.from_proto(info) for info in response.nodes_info]

    def register_node(self, public_key_pem: bytes, *, name: str | None = None) -> int:
        """Register a SuperNode's public key (``flwr supernode register``); returns the node id
        the SuperNode gets when it connects with that key. A key already registered, or one
        Flower refuses, raises SuperLinkRefused."""
        request = RegisterNodeRequest(public_key=public_key_pem, name=name)
        response = self._refusable("RegisterNode", request)
        if not response.node_id:
            raise SuperLinkRefused(200, "no node id in the answer")
        return int(response.node_id)

    def unregister_node(self, node_id: int) -> None:
        """Remove a registered SuperNode (``flwr supernode unregister``): its key is refused
        from then on. An unknown node id raises SuperLinkRefused."""
        self._refusable("UnregisterNode", UnregisterNodeRequest(node_id=node_id))

    def _refusable(self, method: str, request: Any) -> Any:
        """``_call`` for requests the SuperLink may refuse: its answer is not a lost link."""
        try:
            return self._call(method, request)
        except SuperLinkUnavailable as exc:
            cause = exc.__cause__
            if isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code < 500:
                raise SuperLinkRefused(
                    cause.response.status_code, _error_detail(cause.response)
                ) from None
            raise

    def run_log(self, run_id: int) -> str:
        """What a finished run's ServerApp wrote: Flower sends it to the SuperLink, not to any
        console (the call behind ``flwr log``). The SuperLink hands it out once and then clears
        it; on a run not finished yet this waits until it finishes."""
        stream = self._call("StreamLogs", StreamLogsRequest(run_id=run_id))
        return "".join(response.log_output for response in stream)

    def close(self) -> None:
        self._client.close()
