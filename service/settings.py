"""The one settings object, read from LRQ_* environment variables."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import platformdirs

from service.errors import InputError

#: Where the default SQLite database and serverless broker live.
DEFAULT_HOME = Path(platformdirs.user_data_dir("lrq", appauthor=False))


class SettingsError(InputError):
    """Raised when an LRQ_* variable (or a settings override) is not a valid value."""


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("not a boolean (true/false, 1/0, yes/no, on/off)")


def _optional_path(text: str) -> Path | None:
    return Path(text) if text else None


def _log_format(text: str) -> str:
    if text not in ("text", "json"):
        raise ValueError("must be text or json")
    return text


#: name -> (parser of a text value, default, lower bound, whether the bound is exclusive).
#: A plain table rather than pydantic: the CLI reads settings at every start, and
#: pydantic-settings alone took longer to import than click.
_FIELDS: dict[str, tuple[Callable[[str], Any], Any, float | None, bool]] = {
    "home": (Path, DEFAULT_HOME, None, False),
    "database_url": (str, "", None, False),
    "broker_url": (str, "", None, False),
    "broker_ca_file": (str, "", None, False),
    "broker_timeout": (float, 5.0, 0, True),
    "db_connect_timeout": (float, 10.0, 0, True),
    "db_statement_timeout": (float, 300.0, 0, True),
    "data_dir": (_optional_path, None, None, False),
    "max_rows": (int, 10_000_000, 0, True),
    "max_features": (int, 10_000, 0, True),
    "max_epochs": (int, 1_000_000, 0, True),
    "max_row_epochs": (int, 50_000_000_000, 0, True),
    "max_steps": (int, 100_000_000, 0, True),
    "max_dataset_bytes": (int, 512 * 1024 * 1024, 0, True),
    "max_grid_points": (int, 10_000, 0, True),
    "lease_seconds": (float, 60.0, 0, True),
    "max_attempts": (int, 3, 0, True),
    "soft_time_limit": (float, 3 * 3600.0, 0, True),
    "time_limit": (float, 3 * 3600.0 + 60.0, 0, True),
    "visibility_timeout": (float, 6 * 3600.0, 0, True),
    "record_every_epochs": (int, 50, 0, True),
    "record_every_seconds": (float, 2.0, 0, True),
    "torch_threads": (int, 0, 0, False),
    "reconcile_interval": (float, 30.0, 0, True),
    "auto_gpu_min_batch_elements": (int, 1_000_000, 0, True),
    "task_events": (_boolean, True, None, False),
    "log_format": (_log_format, "text", None, False),
}


def _convert(parse: Callable[[str], Any], raw: Any) -> Any:
    """A field's value from an environment string or from a Python value given in code."""
    if isinstance(raw, str):
        return parse(raw)
    if parse is _boolean:
        if not isinstance(raw, bool):
            raise ValueError("not a boolean")
        return raw
    if parse is int or parse is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError("not a number")
        if parse is int and raw != int(raw):
            raise ValueError("not a whole number")
        return parse(raw)
    if parse is _optional_path:
        return None if raw is None else Path(raw)
    return parse(raw)


def _checked(name: str, raw: Any) -> Any:
    """A field's valid value, or SettingsError naming the variable."""
    parse, _, bound, strict = _FIELDS[name]
    label = f"LRQ_{name.upper()}"
    try:
        value = _convert(parse, raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{label}: {raw!r} is not valid: {exc}") from None
    if bound is not None and (value <= bound if strict else value < bound):
        relation = ">" if strict else ">="
        raise SettingsError(f"{label}: must be {relation} {bound:g}, got {raw!r}")
    return value


class FieldDefault(NamedTuple):
    """A field's default, where code reads ``Settings.model_fields[name].default``."""

    default: Any


class Settings:
    """Everything configurable; defaults need no server."""

    model_fields: ClassVar[dict[str, FieldDefault]] = {
        name: FieldDefault(default) for name, (_, default, _, _) in _FIELDS.items()
    }

    #: Directory for the default SQLite database and the filesystem broker.
    home: Path
    #: SQLAlchemy URL; empty means a SQLite file under ``home``.
    database_url: str
    #: Celery broker URL; empty means a filesystem broker under ``home`` (no server).
    broker_url: str
    #: CA file for rediss:// brokers; empty means the system's CAs.
    broker_ca_file: str
    #: Seconds a publish may take before the broker counts as unreachable.
    broker_timeout: float
    #: Seconds to connect to the database before it counts as unreachable (PostgreSQL).
    db_connect_timeout: float
    #: Longest statement a client command (not a worker) may run on PostgreSQL, in seconds.
    db_statement_timeout: float
    #: Files named by a spec's ``data.path`` must lie inside this directory (default: cwd).
    data_dir: Path | None

    #: Limits that protect a worker; a spec past any of them is refused at submit.
    max_rows: int
    max_features: int
    max_epochs: int
    max_row_epochs: int
    #: Optimizer steps (epochs x batches per epoch): what a job's run time grows with.
    max_steps: int
    max_dataset_bytes: int
    max_grid_points: int

    #: A job's lease; a worker renews it while it runs, and a lapsed lease is reclaimed.
    lease_seconds: float
    #: Times a job may be claimed before a lost worker fails it.
    max_attempts: int
    #: Soft and hard limits on one attempt; the hard one stays below the visibility timeout.
    soft_time_limit: float
    time_limit: float
    visibility_timeout: float
    #: Epoch rows are written (with a checkpoint) every N epochs or T seconds, whichever first.
    record_every_epochs: int
    record_every_seconds: float
    #: Torch threads per pool process; 0 shares the host's cores among the pool's processes.
    torch_threads: int
    #: Seconds between a worker's reconciler passes.
    reconcile_interval: float
    #: A ``device: auto`` torch job goes to a live GPU worker when one step's batch holds at
    #: least this many values (rows x features); see benchmarks/bench_auto_device.py.
    auto_gpu_min_batch_elements: int
    #: Celery task events (sent and started/succeeded/failed), for Flower to show the work.
    task_events: bool
    #: Worker log lines: ``text`` (Celery's layout, naming the job) or ``json`` (one object a line).
    log_format: Literal["text", "json"]

    def __init__(self, **overrides: Any) -> None:
        unknown = sorted(set(overrides) - set(_FIELDS))
        if unknown:
            raise SettingsError(f"{unknown[0]}: not a setting")
        # Environment names are matched without regard to case, as before.
        environment = {
            key.upper(): value for key, value in os.environ.items() if key[:4].upper() == "LRQ_"
        }
        for name, (_, default, _, _) in _FIELDS.items():
            if name in overrides:
                raw = overrides[name]
            else:
                raw = environment.get(f"LRQ_{name.upper()}", default)
            setattr(self, name, raw if raw is default else _checked(name, raw))

    def model_copy(self, *, update: dict[str, Any] | None = None) -> Settings:
        """A copy with some fields replaced (validated like the environment's)."""
        values = {name: getattr(self, name) for name in _FIELDS}
        values.update(update or {})
        return Settings(**values)

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in _FIELDS)
        return f"Settings({shown})"

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
