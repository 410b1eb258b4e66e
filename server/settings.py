"""Florist's settings: one pydantic-settings class, read from FLORIST_* environment variables."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# An API token as server/tokens.py makes them: a prefix, a 12-hex-digit id, a url-safe secret.
TOKEN_FORM = re.compile(r"florist_[0-9a-f]{12}_[A-Za-z0-9_-]{20,}")


class Settings(BaseSettings):
    """Where everything lives. Defaults give the embedded, single-machine setup."""

    # hide_input_in_errors: a refused setting's message never echoes the database URL or token.
    model_config = SettingsConfigDict(
        env_prefix="FLORIST_", extra="ignore", hide_input_in_errors=True
    )

    home: Path = Field(default=Path(".florist"), description="State folder: database, logs.")
    database_url: str = Field(
        default="", description="SQLAlchemy URL; empty means a SQLite file in `home`."
    )
    api_host: str = "127.0.0.1"
    # Flower's SuperLink takes 8000 (HTTP), 9092 (Fleet gRPC), 9093 and 9094+ by default.
    api_port: int = 8080
    superlink_control: str = Field(
        default="127.0.0.1:8000", description="The SuperLink's Control API (HTTP), host:port."
    )
    superlink_fleet: str = Field(
        default="127.0.0.1:9092", description="The SuperLink's Fleet API (gRPC), host:port."
    )
    supernode_port: int = Field(
        default=9100,
        ge=1,
        le=65535,
        description="ClientApp-side API port of `florist up`'s first SuperNode; the next get +1.",
    )
    insecure: bool = Field(default=True, description="Plain-text links, for loopback only.")
    log_to_stdout: bool = Field(
        default=False,
        description="Supervised processes write to this process's stdout/stderr instead of "
        "files under `home`/logs: a container's runtime collects them (`docker logs`).",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="How Florist's processes (API and run follower, ServerApp) write their logs: "
        "`text`, or `json` (one object a line, with the experiment and run ids it concerns).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="The lowest level logged."
    )
    metrics_recent_s: float = Field(
        default=3600.0,
        ge=0,
        description="`/metrics` reports each unfinished experiment and those that finished "
        "this many seconds ago or less.",
    )
    metrics_max_experiments: int = Field(
        default=50,
        ge=1,
        le=1000,
        description="At most this many experiments (the newest) in `/metrics`: a scrape costs "
        "a few grouped queries over their rows, whatever the database holds.",
    )
    metrics_node_window_s: float = Field(
        default=300.0,
        gt=0,
        description="An experiment's node counts as connected while its latest recorded reply "
        "is at most this many seconds old.",
    )
    status_poll_s: float = Field(default=1.0, gt=0, description="How often runs are followed.")
    max_model_parameters: int = Field(
        default=50_000_000,
        ge=1,
        description="The largest model (in parameters) an experiment may train: every node and "
        "the server hold it, and the database keeps its checkpoints. Counted at submission on "
        "a model without storage (torch's meta device).",
    )
    sse_max_streams: int = Field(
        default=100,
        ge=1,
        description="Server-sent event streams open at once; another is refused with 503 and "
        "Retry-After.",
    )
    sse_max_lifetime_s: float = Field(
        default=3600.0,
        gt=0,
        description="A server-sent event stream ends after this long with a `reconnect` event; "
        "the client reconnects with Last-Event-ID and misses nothing.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    auto_resume: int = Field(
        default=3,
        ge=0,
        le=1000,
        description="Times an experiment whose run was lost (its ServerApp or the SuperLink "
        "died) is submitted again, resuming from its last committed round, before it fails; "
        "0: a lost run fails the experiment (POST …/resume still resumes it).",
    )
    superlink_database: str = Field(
        default="superlink.db",
        description="The SuperLink's state file (runs, nodes, messages), relative to `home`, "
        "so that a restarted SuperLink knows its runs and nodes; `:memory:` keeps it in memory.",
    )

    simulation_control: str = Field(
        default="",
        description="The simulation SuperLink's Control API (HTTP), host:port: where "
        '`"mode": "simulation"` experiments run (docs/simulation.md). Empty: simulation '
        "mode is off, unless `florist up`/`florist server` start one (at 127.0.0.1:8010 then).",
    )
    simulation_max_virtual_clients: int = Field(
        default=100_000,
        ge=1,
        description="The most virtual clients one simulation experiment may declare.",
    )
    simulation_cpus: int | None = Field(
        default=None,
        ge=1,
        description="CPUs Ray may use for a simulation run; none: every core of this machine.",
    )
    simulation_client_cpus: int = Field(
        default=1,
        ge=1,
        description="CPUs one virtual client's ClientApp takes: simulation_cpus / this many "
        "virtual clients train at once (one Ray actor each).",
    )
    simulation_object_store_mb: int = Field(
        default=256,
        ge=80,
        description="Cap on Ray's shared-memory object store (MiB); it holds the messages in "
        "flight, a few copies of the model.",
    )

    # --- TLS and SuperNode authentication (docs/tls-and-node-auth.md) ---------------------------
    tls_dir: Path | None = Field(
        default=None,
        description="A folder made by `florist certs`: ca.crt, server.crt, server.key. The "
        "explicit FLORIST_TLS_* files below win over it.",
    )
    tls_ca_cert: Path | None = Field(
        default=None, description="The CA certificate clients verify the SuperLink and API with."
    )
    tls_cert: Path | None = Field(default=None, description="The server's certificate (PEM).")
    tls_key: Path | None = Field(default=None, description="The server's private key (PEM).")
    supernode_auth: bool = Field(
        default=False,
        description="The SuperLink admits only SuperNodes whose public key is registered "
        "(`florist node add`); needs TLS.",
    )
    supernode_auth_key: Path | None = Field(
        default=None,
        description="This SuperNode's private key (OpenSSH, `florist node keygen`), for a "
        "SuperLink with SuperNode authentication.",
    )
    force_insecure: bool = Field(
        default=False,
        description="Allow plain text on an address other than loopback (refused otherwise).",
    )

    @field_validator(
        "tls_dir", "tls_ca_cert", "tls_cert", "tls_key", "supernode_auth_key", mode="before"
    )
    @classmethod
    def _empty_path_is_none(cls, value: object) -> object:
        # compose passes unset variables as empty strings, which would otherwise mean ".".
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _transport_is_one_thing(self) -> Settings:
        """TLS files switch TLS on; FLORIST_INSECURE may not say otherwise, and SuperNode
        authentication needs TLS (Flower's SuperLink refuses it in plain text)."""
        tls_given = self.tls_dir is not None or self.tls_ca_cert is not None
        if tls_given:
            if "insecure" in self.model_fields_set and self.insecure:
                raise ValueError(
                    "FLORIST_INSECURE=true contradicts FLORIST_TLS_DIR/FLORIST_TLS_CA_CERT"
                )
            self.insecure = False
        elif not self.insecure:
            raise ValueError(
                "FLORIST_INSECURE=false needs certificates: FLORIST_TLS_DIR (`florist certs`) "
                "or FLORIST_TLS_CA_CERT"
            )
        if self.supernode_auth and self.insecure:
            raise ValueError("FLORIST_SUPERNODE_AUTH needs TLS: set FLORIST_TLS_DIR")
        return self

    def tls_file(self, which: Literal["ca", "cert", "key"]) -> Path | None:
        """One of the TLS files: the explicit setting, else its name in ``tls_dir``."""
        explicit = {"ca": self.tls_ca_cert, "cert": self.tls_cert, "key": self.tls_key}[which]
        if explicit is not None:
            return explicit.expanduser().resolve()
        if self.tls_dir is None:
            return None
        name = {"ca": "ca.crt", "cert": "server.crt", "key": "server.key"}[which]
        return (self.tls_dir.expanduser() / name).resolve()

    def api_tls(self) -> bool:
        """The API serves HTTPS: TLS is on and it listens beyond loopback."""
        return not self.insecure and not is_loopback(self.api_host)

    # --- who may use the API (docs/security.md) ---
    auth: Literal["auto", "on", "open"] = Field(
        default="auto",
        description="API authentication: `on` (tokens), `open` (no login, every request may do "
        "everything), `auto` (open when the API binds a loopback address, on otherwise).",
    )
    auth_force_open: bool = Field(
        default=False,
        description="Allow `auth=open` on an address that is not loopback: anyone who can reach "
        "the API may then drive it. Refused without this.",
    )
    token: SecretStr = Field(
        default=SecretStr(""),
        description="The API token the CLI sends as `Authorization: Bearer` "
        "(`florist token create`).",
    )
    admin_token: SecretStr = Field(
        default=SecretStr(""),
        description="A token (`florist token generate`) the API registers as an admin token "
        "named `admin-token` when it starts, unless its id is known: how a deployment gets its "
        "first token from a secret store (the Helm chart's Secret, compose's .env) without a "
        "shell in the container. Revoking it holds across restarts.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated Host names the API answers to besides loopback names and "
        "`api_host` (a guard against DNS rebinding); `*` answers to any.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated origins (https://host[:port]) other web pages may call the "
        "API from, with CORS; empty: CORS off and only the API's own pages may write.",
    )
    session_ttl_s: float = Field(
        default=12 * 3600.0, gt=0, description="A dashboard login lasts this long."
    )

    @field_validator("allowed_hosts", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("admin_token")
    @classmethod
    def _token_form(cls, value: SecretStr) -> SecretStr:
        text = value.get_secret_value().strip()
        if text and not TOKEN_FORM.fullmatch(text):
            raise ValueError(
                "not a Florist token: make one with `florist token generate` "
                "(florist_<12 hex digits>_<secret>)"
            )
        return SecretStr(text)

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        problems = self.security_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def is_local(self) -> bool:
        """Local mode: the API binds a loopback address, so only this machine can reach it."""
        return is_loopback(self.api_host)

    def auth_mode(self) -> Literal["on", "open"]:
        if self.auth == "auto":
            return "open" if self.is_local() else "on"
        return self.auth

    def security_problems(self) -> list[str]:
        """What makes these settings unsafe to serve with; checked when settings are read and
        again when the API starts (a command line may have changed the host since)."""
        problems = []
        if self.auth_mode() == "open" and not self.is_local() and not self.auth_force_open:
            problems.append(
                f"FLORIST_AUTH=open on {self.api_host}, which is not a loopback address: anyone "
                "who can reach it could drive Florist. Use FLORIST_AUTH=on with tokens "
                "(`florist token create`), or set FLORIST_AUTH_FORCE_OPEN=true if you must"
            )
        if not self.is_local() and has_placeholder_password(self.database_url):
            problems.append(
                "FLORIST_DATABASE_URL's password is a placeholder of the examples (as "
                f"deploy/.env.example's) and the API binds {self.api_host}, not a loopback "
                "address: set a real password"
            )
        return problems

    def superlink_state_file(self) -> Path | None:
        """Where ``florist up``/``florist server`` keep the SuperLink's state (None: memory)."""
        if self.superlink_database == ":memory:":
            return None
        return (self.home / self.superlink_database).resolve()

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'florist.db').resolve()}"


# Passwords of examples and docs (deploy/.env.example): never to be served outside loopback.
PLACEHOLDER_PASSWORDS = frozenset(
    {"change-me", "changeme", "password", "florist", "example", "secret", "postgres", "admin"}
)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses; False for 0.0.0.0 (every interface)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def has_placeholder_password(url: str) -> bool:
    """True if the database URL's password is one of the known placeholders."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if not url:
        return False
    try:
        password = make_url(url).password
    except ArgumentError:
        return False
    return password is not None and str(password).lower() in PLACEHOLDER_PASSWORDS


def get_settings() -> Settings:
    """Settings as the environment says now (a factory: nothing is read at import time)."""
    return Settings()
