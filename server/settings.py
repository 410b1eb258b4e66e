"""Florist's settings: one pydantic-settings class, read from FLORIST_* environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where everything lives. Defaults give the embedded, single-machine setup."""

    model_config = SettingsConfigDict(env_prefix="FLORIST_", extra="ignore")

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
    status_poll_s: float = Field(default=1.0, gt=0, description="How often runs are followed.")

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'florist.db').resolve()}"


def get_settings() -> Settings:
    """Settings as the environment says now (a factory: nothing is read at import time)."""
    return Settings()
