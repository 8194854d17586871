"""The one settings object, read from LRQ_* environment variables."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Where the default SQLite database and serverless broker live.
DEFAULT_HOME = Path(platformdirs.user_data_dir("lrq", appauthor=False))


class Settings(BaseSettings):
    """Everything configurable; defaults need no server."""

    model_config = SettingsConfigDict(env_prefix="LRQ_", extra="ignore")

    #: Directory for the default SQLite database and the filesystem broker.
    home: Path = DEFAULT_HOME
    #: SQLAlchemy URL; empty means a SQLite file under ``home``.
    database_url: str = ""
    #: Celery broker URL; empty means a filesystem broker under ``home`` (no server).
    broker_url: str = ""
    #: CA file for rediss:// brokers; empty means the system's CAs.
    broker_ca_file: str = ""
    #: Seconds a publish may take before the broker counts as unreachable.
    broker_timeout: float = Field(5.0, gt=0)
    #: Seconds to connect to the database before it counts as unreachable (PostgreSQL).
    db_connect_timeout: float = Field(10.0, gt=0)
    #: Longest statement a client command (not a worker) may run on PostgreSQL, in seconds.
    db_statement_timeout: float = Field(300.0, gt=0)
    #: Files named by a spec's ``data.path`` must lie inside this directory (default: cwd).
    data_dir: Path | None = None

    #: Limits that protect a worker; a spec past any of them is refused at submit.
    max_rows: int = Field(10_000_000, gt=0)
    max_features: int = Field(10_000, gt=0)
    max_epochs: int = Field(1_000_000, gt=0)
    max_row_epochs: int = Field(50_000_000_000, gt=0)
    #: Optimizer steps (epochs x batches per epoch): what a job's run time grows with.
    max_steps: int = Field(100_000_000, gt=0)
    max_dataset_bytes: int = Field(512 * 1024 * 1024, gt=0)
    max_grid_points: int = Field(10_000, gt=0)

    #: A job's lease; a worker renews it while it runs, and a lapsed lease is reclaimed.
    lease_seconds: float = Field(60.0, gt=0)
    #: Times a job may be claimed before a lost worker fails it.
    max_attempts: int = Field(3, gt=0)
    #: Soft and hard limits on one attempt; the hard one stays below the visibility timeout.
    soft_time_limit: float = Field(3 * 3600.0, gt=0)
    time_limit: float = Field(3 * 3600.0 + 60.0, gt=0)
    visibility_timeout: float = Field(6 * 3600.0, gt=0)
    #: Epoch rows are written (with a checkpoint) every N epochs or T seconds, whichever first.
    record_every_epochs: int = Field(50, gt=0)
    record_every_seconds: float = Field(2.0, gt=0)
    #: A worker packing a sweep claims at most this many of its jobs (the one it was sent
    #: included), and no more than fit in ``pack_max_bytes`` of members' own state.
    pack_max_members: int = Field(64, gt=0)
    pack_max_bytes: int = Field(256 * 1024 * 1024, gt=0)
    #: Torch threads per pool process; 0 shares the host's cores among the pool's processes.
    torch_threads: int = Field(0, ge=0)
    #: Seconds between a worker's reconciler passes.
    reconcile_interval: float = Field(30.0, gt=0)
    #: A ``device: auto`` torch job goes to a live GPU worker when one step's batch holds at
    #: least this many values (rows x features); see benchmarks/bench_auto_device.py.
    auto_gpu_min_batch_elements: int = Field(1_000_000, gt=0)
    #: Celery task events (sent and started/succeeded/failed), for Flower to show the work.
    task_events: bool = True
    #: Worker log lines: ``text`` (Celery's layout, naming the job) or ``json`` (one object a line).
    log_format: Literal["text", "json"] = "text"

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'lrq.db'}"

    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://localhost//"

    def broker_folder(self) -> Path:
        return self.home / "broker"

    def resolved_data_dir(self) -> Path:
        return (self.data_dir or Path.cwd()).resolve()


@functools.cache
def get_settings() -> Settings:
    """The settings, read once per process."""
    return Settings()
