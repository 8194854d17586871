"""The one settings object, read from LRQ_* environment variables."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple
from urllib.parse import urlsplit

import platformdirs

from service.errors import SettingsError

#: Where the default SQLite database and serverless broker live.
DEFAULT_HOME = Path(platformdirs.user_data_dir("lrq", appauthor=False))
#: The password .env.example once shipped: a stack started with it has a published password.
PLACEHOLDER_PASSWORDS = frozenset({"change-me"})
#: Database URL schemes people write, and the SQLAlchemy driver lrq uses for each.
DATABASE_DRIVERS = {
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "postgres+psycopg": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
    "sqlite": "sqlite",
    "sqlite+pysqlite": "sqlite",
}
BROKER_SCHEMES = ("redis", "rediss", "filesystem")
DATABASE_EXAMPLE = "postgresql+psycopg://USER:PASSWORD@HOST:5432/DB or sqlite:///PATH"
#: Fields whose values may hold a password: their errors never echo the value.
_SECRET_FIELDS = frozenset({"database_url", "broker_url"})


def _refuse_placeholder(password: str | None) -> None:
    if password in PLACEHOLDER_PASSWORDS:
        raise ValueError(
            f"the password is the placeholder {password!r}: set a real one "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')"
        )


def normalize_database_url(url: str) -> str:
    """The URL with lrq's driver (``postgres://`` becomes ``postgresql+psycopg``), or ValueError."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ValueError(f"not a database URL; expected {DATABASE_EXAMPLE}") from None
    driver = DATABASE_DRIVERS.get(parsed.drivername.lower())
    if driver is None:
        raise ValueError(
            f"{parsed.drivername!r} databases are not supported; expected {DATABASE_EXAMPLE}"
        )
    _refuse_placeholder(parsed.password)
    if driver == parsed.drivername:
        return url
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


def check_broker_url(url: str) -> str:
    """The URL if lrq can use it (redis, rediss or filesystem), else ValueError."""
    try:
        parts = urlsplit(url)
        password = parts.password
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise ValueError("not a broker URL; expected redis://[:PASSWORD@]HOST:6379/0") from None
    if parts.scheme.lower() not in BROKER_SCHEMES:
        scheme = parts.scheme or url.partition(":")[0]
        raise ValueError(
            f"{scheme!r} brokers are not supported; use redis://, rediss:// or filesystem://"
        )
    _refuse_placeholder(password)
    return url


class _WrongType(ValueError):
    """A value of the wrong kind; the message gets the value appended (unless secret)."""


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _WrongType("input should be a valid integer") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _WrongType("input should be a valid number") from None


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on", "t", "y"):
        return True
    if lowered in ("0", "false", "no", "off", "f", "n"):
        return False
    raise _WrongType("input should be a valid boolean")


def _optional_path(text: str) -> Path | None:
    return Path(text) if text else None


def _log_format(text: str) -> str:
    if text not in ("text", "json"):
        raise _WrongType("input should be 'text' or 'json'")
    return text


def _database_url(text: str) -> str:
    return normalize_database_url(text) if text else text


def _broker_url(text: str) -> str:
    return check_broker_url(text) if text else text


#: name -> (parser of a text value, default, lower bound, whether the bound is exclusive).
#: A plain table rather than pydantic: the CLI reads settings at every start, and
#: pydantic-settings alone took longer to import than click.
_FIELDS: dict[str, tuple[Callable[[str], Any], Any, float | None, bool]] = {
    "home": (Path, DEFAULT_HOME, None, False),
    "database_url": (_database_url, "", None, False),
    "broker_url": (_broker_url, "", None, False),
    "broker_ca_file": (str, "", None, False),
    "broker_timeout": (_number, 5.0, 0, True),
    "db_connect_timeout": (_number, 10.0, 0, True),
    "db_statement_timeout": (_number, 300.0, 0, True),
    "data_dir": (_optional_path, None, None, False),
    "max_rows": (_integer, 10_000_000, 0, True),
    "max_features": (_integer, 10_000, 0, True),
    "max_epochs": (_integer, 1_000_000, 0, True),
    "max_row_epochs": (_integer, 50_000_000_000, 0, True),
    "max_steps": (_integer, 100_000_000, 0, True),
    "max_dataset_bytes": (_integer, 512 * 1024 * 1024, 0, True),
    "max_grid_points": (_integer, 10_000, 0, True),
    "lease_seconds": (_number, 60.0, 0, True),
    "max_attempts": (_integer, 3, 0, True),
    "soft_time_limit": (_number, 3 * 3600.0, 0, True),
    "time_limit": (_number, 3 * 3600.0 + 60.0, 0, True),
    "visibility_timeout": (_number, 6 * 3600.0, 0, True),
    "record_every_epochs": (_integer, 50, 0, True),
    "record_every_seconds": (_number, 2.0, 0, True),
    "pack_max_members": (_integer, 64, 0, True),
    "pack_max_bytes": (_integer, 256 * 1024 * 1024, 0, True),
    "torch_threads": (_integer, 0, 0, False),
    "reconcile_interval": (_number, 30.0, 0, True),
    "auto_gpu_min_batch_elements": (_integer, 1_000_000, 0, True),
    "task_events": (_boolean, True, None, False),
    "log_format": (_log_format, "text", None, False),
}


def _convert(parse: Callable[[str], Any], raw: Any) -> Any:
    """A field's value from an environment string or from a Python value given in code."""
    if isinstance(raw, str):
        return parse(raw)
    if parse is _boolean:
        if not isinstance(raw, bool):
            raise _WrongType("input should be a valid boolean")
        return raw
    if parse is _integer or parse is _number:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise _WrongType(
                f"input should be a valid {'integer' if parse is _integer else 'number'}"
            )
        if parse is _integer and raw != int(raw):
            raise _WrongType("input should be a valid integer")
        return int(raw) if parse is _integer else float(raw)
    if parse is _optional_path:
        return None if raw is None else Path(raw)
    if parse is Path:
        return Path(raw)
    raise _WrongType("input should be a valid string")


def _problem(name: str, raw: Any) -> tuple[Any, str | None]:
    """A field's valid value, or the reason it is refused (naming the variable)."""
    parse, _, bound, strict = _FIELDS[name]
    label = f"LRQ_{name.upper()}"
    # A refused URL may hold a password: its value is never repeated.
    shown = "" if name in _SECRET_FIELDS else f", got {_short(raw)}"
    try:
        value = _convert(parse, raw)
    except _WrongType as exc:
        return None, f"{label}: {exc}{shown}"
    except ValueError as exc:
        return None, f"{label}: {exc}"
    if bound is not None and (value <= bound if strict else value < bound):
        relation = "greater than" if strict else "greater than or equal to"
        return None, f"{label}: input should be {relation} {bound:g}{shown}"
    return value, None


def _short(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 60 else text[:57] + "..."


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
    #: A worker packing a sweep claims at most this many of its jobs (the one it was sent
    #: included), and no more than fit in ``pack_max_bytes`` of members' own state.
    pack_max_members: int
    pack_max_bytes: int
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
        problems = []
        for name, (_, default, _, _) in _FIELDS.items():
            if name in overrides:
                raw = overrides[name]
            else:
                raw = environment.get(f"LRQ_{name.upper()}", default)
            value, problem = (raw, None) if raw is default else _problem(name, raw)
            if problem is not None:
                problems.append(problem)
            setattr(self, name, value)
        if problems:
            raise SettingsError("; ".join(problems))

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
    """The settings, read once per process; SettingsError names a refused variable."""
    return Settings()
