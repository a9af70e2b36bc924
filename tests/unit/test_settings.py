"""Settings: defaults, INFERD_* variables, .env, the TOML file, precedence and refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from inferd.errors import ConfigError
from inferd.settings import Settings


@pytest.fixture(autouse=True)
def _in_empty_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each test where no stray ``.env`` can be picked up."""
    monkeypatch.chdir(tmp_path)


def write_toml(folder: Path, text: str) -> Path:
    path = folder / "inferd.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    settings = Settings.load()

    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.request_timeout_ms == 100
    assert settings.max_queue_size == 2000
    assert settings.max_batch_size == 32
    assert settings.batch_window_ms == 5
    assert settings.shed_threshold == 0.8
    assert settings.models is None
    assert settings.models_dir == Path("models")
    assert settings.log_format == "json"


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERD_PORT", "9100")
    monkeypatch.setenv("INFERD_REQUEST_TIMEOUT_MS", "250.5")
    monkeypatch.setenv("INFERD_MODELS_DIR", "/srv/models")
    monkeypatch.setenv("INFERD_GC_FREEZE", "false")
    monkeypatch.setenv("INFERD_GC_THRESHOLD", "0")
    monkeypatch.setenv("INFERD_LOG_LEVEL", "debug")

    settings = Settings.load()

    assert settings.port == 9100
    assert settings.request_timeout_ms == 250.5
    assert settings.models_dir == Path("/srv/models")
    assert settings.gc_freeze is False
    assert settings.gc_threshold == 0
    assert settings.log_level == "debug"


def test_variables_without_the_prefix_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "1234")

    assert Settings.load().port == 8000


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("iris", ["iris"]),
        ("iris,iris-forest", ["iris", "iris-forest"]),
        (" iris , iris-forest ,", ["iris", "iris-forest"]),
        ('["iris", "iris-forest"]', ["iris", "iris-forest"]),
        (" , ", None),
    ],
)
def test_models_variable_is_a_comma_separated_list(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str] | None
) -> None:
    monkeypatch.setenv("INFERD_MODELS", value)

    assert Settings.load().models == expected


def test_toml_file_given_to_load(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'port = 9200\nmodels = ["iris"]\nshed_threshold = 0.5\n')

    settings = Settings.load(config_file=path)

    assert settings.port == 9200
    assert settings.models == ["iris"]
    assert settings.shed_threshold == 0.5
    assert settings.max_batch_size == 32  # untouched keys keep their defaults


def test_toml_file_named_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_toml(tmp_path, "max_batch_size = 64\n")
    monkeypatch.setenv("INFERD_CONFIG_FILE", str(path))

    assert Settings.load().max_batch_size == 64


def test_toml_file_does_not_leak_into_later_loads(tmp_path: Path) -> None:
    Settings.load(config_file=write_toml(tmp_path, "port = 9200\n"))

    assert Settings.load().port == 8000
    assert Settings().port == 8000


def test_precedence_overrides_then_environment_then_dotenv_then_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_toml(
        tmp_path, "port = 1001\nmax_batch_size = 11\nmax_queue_size = 111\nretry_after_s = 7\n"
    )
    (tmp_path / ".env").write_text("INFERD_MAX_BATCH_SIZE=22\nINFERD_MAX_QUEUE_SIZE=222\n")
    monkeypatch.setenv("INFERD_PORT", "2002")
    monkeypatch.setenv("INFERD_MAX_BATCH_SIZE", "33")

    settings = Settings.load(config_file=path, port=3003)

    assert settings.port == 3003  # explicit beats environment and TOML
    assert settings.max_batch_size == 33  # environment beats .env and TOML
    assert settings.max_queue_size == 222  # .env beats TOML
    assert settings.retry_after_s == 7  # TOML beats the default


def test_overrides_left_unset_do_not_hide_other_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERD_PORT", "9300")

    settings = Settings.load(port=None, models_dir=None)

    assert settings.port == 9300
    assert settings.models_dir == Path("models")


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"

    with pytest.raises(ConfigError) as info:
        Settings.load(config_file=missing)

    assert str(missing) in info.value.message
    assert "does not exist" in info.value.message


def test_missing_config_file_from_the_environment_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERD_CONFIG_FILE", str(tmp_path / "absent.toml"))

    with pytest.raises(ConfigError, match=r"absent\.toml"):
        Settings.load()


def test_invalid_toml_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Settings.load(config_file=write_toml(tmp_path, "port = = 1\n"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", -1),
        ("port", 70000),
        ("shed_threshold", 0),
        ("shed_threshold", 1.5),
        ("max_batch_size", 0),
        ("request_timeout_ms", 0),
        ("log_level", "loud"),
        ("grpc_port", 0),
        ("grpc_port", 70000),
    ],
)
def test_invalid_values_are_config_errors(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        Settings.load(**{field: value})

    assert info.value.message.startswith("invalid settings")


def test_grpc_is_off_unless_given_a_port_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.load().grpc_port is None
    monkeypatch.setenv("INFERD_GRPC_PORT", "8001")
    assert Settings.load().grpc_port == 8001
    with pytest.raises(ConfigError, match="gRPC needs a port of its own"):
        Settings.load(port=8001)


def test_invalid_environment_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERD_PORT", "-5")

    with pytest.raises(ConfigError, match="port"):
        Settings.load()


def test_invalid_toml_value_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shed_threshold"):
        Settings.load(config_file=write_toml(tmp_path, "shed_threshold = 0\n"))


def test_dotenv_in_the_current_folder_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "INFERD_PORT=9400\nINFERD_MODELS=iris,iris-forest\nDATABASE_URL=postgres://x\n",
        encoding="utf-8",
    )

    settings = Settings.load()

    assert settings.port == 9400
    assert settings.models == ["iris", "iris-forest"]


def test_dotenv_elsewhere_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("INFERD_PORT=9400\n", encoding="utf-8")
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    assert Settings.load().port == 8000


def test_every_field_is_documented() -> None:
    undocumented = [name for name, f in Settings.model_fields.items() if not f.description]

    assert undocumented == []
    assert all(f.description for f in Settings.model_fields.values())
