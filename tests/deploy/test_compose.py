"""deploy/compose.yaml: the Compose Specification schema, then what the schema cannot say
(the services wire together: dependencies, health checks, files, settings, credentials).

The schema is the one the docker-compose 1.29.2 package ships (tests/deploy/schemas): an
older revision of the specification, so keys added since (top-level ``name``, ``include``,
``develop``...) would be reported as errors, and compose.yaml does not use them.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from inferd.settings import Settings
from tests.deploy.conftest import DEPLOY, ROOT, SCHEMAS

COMPOSE = DEPLOY / "compose.yaml"
INFERD_SERVICES = ("migrate", "api", "worker")
_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose's ``${VAR}`` / ``${VAR:-default}`` with an empty environment (defaults win)."""
    if isinstance(value, str):
        out = _VARIABLE.sub(lambda m: m.group(2) or "", value)
        assert "${" not in out and not re.search(r"(?<!\$)\$\w", out), f"unresolved: {value!r}"
        return out
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # YAML merge keys (<<: *inferd) are resolved by the loader, as Compose does.
    result: dict[str, Any] = interpolate(yaml.safe_load(COMPOSE.read_text()))
    return result


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def seconds(duration: str) -> float:
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration):
        total += float(amount) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def test_it_validates_against_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    jsonschema.Draft201909Validator(schema).validate(compose)


def test_the_schema_catches_mistakes(compose: dict[str, Any]) -> None:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["depends_on"]["migrate"]["condition"] = "service_finished"
    assert not validator.is_valid(broken)
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["helthcheck"] = broken["services"]["api"].pop("healthcheck")
    assert not validator.is_valid(broken)


def test_the_stack_has_every_service(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"postgres", "redis", *INFERD_SERVICES, "prometheus", "grafana"}
    for name, service in services.items():
        assert service.get("image") or service.get("build"), name
    for name in INFERD_SERVICES:
        service = services[name]
        assert service["image"] == "inferd:local"
        build = service["build"]
        assert (DEPLOY / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()


def test_api_and_workers_wait_for_the_migration_and_healthy_stores(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}
        assert depends["postgres"] == {"condition": "service_healthy"}
        assert depends["redis"] == {"condition": "service_healthy"}
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name, service in services.items():
        for target, condition in service.get("depends_on", {}).items():
            assert target in services and target != name
            if condition["condition"] == "service_healthy":
                check = services[target].get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), (name, target)


def test_every_long_running_service_has_a_health_check(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        check = service["healthcheck"]
        if name in {"worker", "migrate"}:  # no HTTP server: nothing to probe
            assert check == {"disable": True}, name
            continue
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, name
        assert seconds(check["timeout"]) < seconds(check["interval"]), name
    api_check = " ".join(services["api"]["healthcheck"]["test"])
    assert "/health/ready" in api_check and "127.0.0.1:8000" in api_check


def test_the_api_and_workers_are_configured_as_in_production(
    services: dict[str, dict[str, Any]],
) -> None:
    fields = {f"INFERD_{name.upper()}": name for name in Settings.model_fields}
    for name in INFERD_SERVICES:
        env = environment(services[name])
        assert set(env) <= set(fields), f"{name}: not settings: {set(env) - set(fields)}"
        Settings(_env_file=None, **{fields[k]: v for k, v in env.items()})  # type: ignore[call-arg]
        assert services[name]["read_only"] is True
        assert {"/tmp", "/data"} <= set(services[name]["tmpfs"])
    api, worker = environment(services["api"]), environment(services["worker"])
    assert api["INFERD_WORKERS"] == "0"
    assert services["worker"]["command"][0] == "worker"
    grace = float(worker["INFERD_SHUTDOWN_GRACE_SECONDS"])
    assert seconds(services["worker"]["stop_grace_period"]) > grace + 1
    assert seconds(services["api"]["stop_grace_period"]) >= 10 + 5  # drain, then models stop


def test_the_database_and_redis_urls_reach_the_services(
    services: dict[str, dict[str, Any]],
) -> None:
    pg = environment(services["postgres"])
    for name in INFERD_SERVICES:
        env = environment(services[name])
        db = urlsplit(env["INFERD_DATABASE_URL"])
        assert db.scheme == "postgresql+asyncpg"
        assert (db.hostname, db.port or 5432) == ("postgres", 5432)
        assert (db.username, db.password) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"])
        assert db.path == "/" + pg["POSTGRES_DB"]
        redis = urlsplit(env["INFERD_REDIS_URL"])
        assert (redis.scheme, redis.hostname) == ("redis", "redis")


def test_volumes_and_mounted_files_exist(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_no_secret_is_hard_coded_without_an_override() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    for name, service in raw["services"].items():
        for key, value in environment(service).items():
            if "PASSWORD" in key:
                assert value.startswith("${"), f"{name}: {key} cannot be overridden"
