"""The service's settings: environment variables with the ``XSAM_`` prefix (or a ``.env`` file).

Every field is documented in docs/api.md ("Settings") and .env.example, and passed to the api
service by docker-compose.yml (tests/deploy/test_settings_passthrough.py checks all three).

Read through the cached `get_settings()`, never at import time, so tests and `xsam serve` can
build a `Settings` of their own and hand it to `create_app(settings)`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    return Path("~/.xsam").expanduser()


class Settings(BaseSettings):
    """Everything the API reads from its environment (``XSAM_<NAME>``)."""

    # An empty variable is the default: docker-compose.yml passes every setting through as
    # ${XSAM_X:-default}, and .env.example leaves XSAM_LEASE_TIMEOUT_S= empty (computed default).
    model_config = SettingsConfigDict(
        env_prefix="XSAM_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    data_dir: Path = Field(
        default_factory=default_data_dir, description="state directory (SQLite, admin token)"
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite under data_dir"
    )
    artifacts_dir: Path | None = Field(
        default=None, description="where job-<id>/model.pt lie; default <data_dir>/artifacts"
    )
    admin_token: SecretStr | None = Field(
        default=None, description="accepted as an admin bearer token when set"
    )
    agent_token: SecretStr | None = Field(
        default=None, description="accepted as an agent bearer token when set"
    )
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    lease_timeout_s: float | None = Field(
        default=None, gt=0, description="heartbeat deadline; default 3 heartbeat intervals"
    )
    reaper_interval_s: float = Field(default=2.0, gt=0)
    retry_backoff_s: float = Field(
        default=5.0, ge=0, description="requeue delay after attempt n: backoff * 2**(n-1)"
    )
    retry_backoff_max_s: float = Field(default=300.0, ge=0)
    idempotency_key_ttl_s: float = Field(
        default=24 * 3600.0,
        gt=0,
        description="an Idempotency-Key names its job this long; then it may name a new one",
    )
    max_queued_jobs_per_user: int = Field(
        default=200, ge=0, description="queued jobs one user token may have (admins: no limit)"
    )
    max_user_priority: int = Field(
        default=10, ge=-1000, le=1000, description="highest priority a user token may ask for"
    )
    max_running_gpus_per_user: int = Field(
        default=0,
        ge=0,
        le=2**31 - 1,
        description="GPUs one owner's running jobs may hold; claim passes over the rest; 0: off",
    )
    submit_rate_per_minute: float = Field(
        default=60.0,
        ge=0,
        description="submits a minute per user token, in bursts up to it; 0: off",
    )
    max_options_bytes: int = Field(
        default=64 * 1024, gt=0, description="size cap of config.model/data.options as JSON"
    )
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    max_ingest_points: int = Field(default=5000, gt=0)
    max_ingest_events: int = Field(default=1000, gt=0)
    max_ingest_log_lines: int = Field(default=5000, gt=0)
    max_log_lines_per_job: int = Field(
        default=200_000,
        ge=2,
        description="log lines kept per job: the first half and the newest half; the middle "
        "is dropped and counted",
    )
    max_study_jobs: int = Field(default=1000, gt=0, description="most jobs one study may expand to")
    stall_step_multiple: float = Field(
        default=10.0,
        gt=1,
        le=1e6,
        description="health rule: a run with no new step for this many median step times (and "
        "at least stall_min_s) is stalled: a `stalled` event, the attempt aborted and retried",
    )
    stall_min_s: float = Field(
        default=60.0,
        gt=0,
        le=7 * 24 * 3600.0,
        description="health rule: the least silence (seconds) that counts as a stall, whatever "
        "the step time (evaluation and checkpoints pause the steps)",
    )
    alpha_edge_searches: int = Field(
        default=5,
        ge=1,
        le=1_000_000,
        description="health rule: α chosen at 0 or at alpha_max this many α searches in a row "
        "gives one `warning` event",
    )
    db_pool_size: int = Field(default=20, gt=0)
    db_max_overflow: int = Field(default=40, ge=0)
    sqlite_busy_timeout_s: float = Field(default=60.0, gt=0)
    run_reaper: bool = Field(default=True, description="run requeue_expired periodically")

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'xsam.db'}"
        if self.artifacts_dir is None:
            self.artifacts_dir = self.data_dir / "artifacts"
        if self.lease_timeout_s is None:
            self.lease_timeout_s = 3 * self.heartbeat_interval_s
        if self.lease_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"lease_timeout_s: must be > heartbeat_interval_s ({self.heartbeat_interval_s})"
                f" (got {self.lease_timeout_s})"
            )
        return self

    @property
    def url(self) -> str:
        assert self.database_url is not None
        return self.database_url

    @property
    def lease_s(self) -> float:
        assert self.lease_timeout_s is not None
        return self.lease_timeout_s

    @property
    def artifacts_path(self) -> Path:
        assert self.artifacts_dir is not None
        return self.artifacts_dir

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / "admin.token"


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
