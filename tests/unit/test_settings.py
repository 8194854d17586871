"""Settings come from LRQ_* variables, checked field by field, without pydantic."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from service.cli import main
from service.settings import Settings, SettingsError, get_settings


def test_environment_values_are_parsed_into_their_types(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LRQ_HOME", str(tmp_path))
    monkeypatch.setenv("LRQ_LEASE_SECONDS", "7.5")
    monkeypatch.setenv("lrq_max_rows", "12")
    monkeypatch.setenv("LRQ_TASK_EVENTS", "false")
    monkeypatch.setenv("LRQ_LOG_FORMAT", "json")
    settings = Settings()
    assert (settings.home, settings.lease_seconds, settings.max_rows) == (tmp_path, 7.5, 12)
    assert (settings.task_events, settings.log_format, settings.data_dir) == (False, "json", None)
    assert settings.resolved_database_url() == f"sqlite:///{tmp_path / 'lrq.db'}"
    assert settings.model_copy(update={"max_rows": 3}).max_rows == 3


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("LRQ_LEASE_SECONDS", "0", "LRQ_LEASE_SECONDS: input should be greater than 0, got '0'"),
        (
            "LRQ_TORCH_THREADS",
            "-1",
            "LRQ_TORCH_THREADS: input should be greater than or equal to 0, got '-1'",
        ),
        ("LRQ_MAX_ROWS", "many", "LRQ_MAX_ROWS: input should be a valid integer, got 'many'"),
        ("LRQ_TASK_EVENTS", "maybe", "LRQ_TASK_EVENTS: input should be a valid boolean"),
        ("LRQ_LOG_FORMAT", "xml", "LRQ_LOG_FORMAT: input should be 'text' or 'json', got 'xml'"),
    ],
)
def test_a_bad_variable_is_one_line_naming_it_and_exit_code_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv("LRQ_HOME", str(tmp_path))
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        Settings()
    assert str(caught.value).startswith(message)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, ["status"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {caught.value}"]
    assert not (tmp_path / "lrq.db").exists()


def test_every_refused_variable_is_named_on_the_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LRQ_MAX_ROWS", "0")
    monkeypatch.setenv("LRQ_DATABASE_URL", "mysql://lrq:pw@127.0.0.1/lrq")
    with pytest.raises(SettingsError) as caught:
        Settings()
    message = str(caught.value)
    assert message.startswith("LRQ_DATABASE_URL: 'mysql' databases are not supported")
    assert message.endswith("; LRQ_MAX_ROWS: input should be greater than 0, got '0'")
    assert ":pw@" not in message


def test_an_unknown_override_is_refused() -> None:
    with pytest.raises(SettingsError, match="max_row: not a setting"):
        Settings(max_row=3)
