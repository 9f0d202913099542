"""The Docker Compose deployment agrees with the code, checked without Docker.

compose/docker-compose.yml names settings, components, brokers and topics that are
defined elsewhere (runtime.settings, runtime.services, runtime.kafka); these tests fail
when the two drift apart.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from runtime.kafka import Topics
from runtime.services import COMPONENTS
from runtime.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
KAFKA_IMAGE = "apache/kafka:"
TOPIC_PREFIX = "tuo"
# Values a user would export before `docker compose up`.
HOST_ENV = {"TUO_POSTGRES_PASSWORD": "0123abcd" * 4, "TUO_PSEUDONYM_KEY": "k" * 40}
_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


@cache
def _raw_text() -> str:
    return COMPOSE_FILE.read_text()


@cache
def _compose() -> dict[str, Any]:
    loaded = yaml.safe_load(_raw_text())
    assert isinstance(loaded, dict), "the compose file must be a YAML mapping"
    return loaded


def _services() -> dict[str, dict[str, Any]]:
    services = _compose().get("services")
    assert isinstance(services, dict) and services, "the compose file has no services"
    return services


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _tuo_services() -> dict[str, dict[str, Any]]:
    """Services that run the `tuo` command (the bus components and migrate)."""
    return {name: s for name, s in _services().items() if _command(s)[:1] == ["tuo"]}


def _bus_services() -> dict[str, dict[str, Any]]:
    """Services that run `tuo run ...`."""
    return {name: s for name, s in _services().items() if _command(s)[:2] == ["tuo", "run"]}


def _brokers() -> dict[str, dict[str, str]]:
    return {
        name: _environment(s)
        for name, s in _services().items()
        if str(s.get("image", "")).startswith(KAFKA_IMAGE)
    }


def _interpolate(value: str, host_env: dict[str, str]) -> str:
    """Resolve ${VAR}, ${VAR:-default} and ${VAR:?error} as Compose does."""

    def replace(match: re.Match[str]) -> str:
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        if host_env.get(name):
            return host_env[name]
        if op in (":?", "?"):
            raise LookupError(f"{name}: {arg}")
        return arg if op in (":-", "-") else ""

    return _INTERPOLATION.sub(replace, value)


def _settings_env_names() -> set[str]:
    return {ENV_PREFIX + field.upper() for field in Settings.model_fields}


def _listener_port(listeners: str, name: str) -> int:
    for listener in listeners.split(","):
        listener_name, _, address = listener.partition("://")
        if listener_name == name:
            return int(address.rsplit(":", 1)[1])
    raise AssertionError(f"no {name} listener in {listeners!r}")


def test_compose_file_parses_into_services() -> None:
    assert {"postgres", "migrate"} <= set(_services())
    assert _bus_services(), "no service runs `tuo run`"


def test_every_tuo_variable_a_service_sets_is_a_settings_field() -> None:
    assert Settings.model_config.get("env_prefix") == ENV_PREFIX == "TUO_"
    known = _settings_env_names()
    unknown = {
        f"{name}: {key}"
        for name, service in _services().items()
        for key in _environment(service)
        if key.upper().startswith(ENV_PREFIX) and key not in known
    }
    assert not unknown, f"not fields of runtime.settings.Settings: {sorted(unknown)}"


def test_tuo_services_are_configured_only_through_tuo_variables() -> None:
    for name, service in _tuo_services().items():
        assert "env_file" not in service, f"{name} reads an env_file"
        other = [key for key in _environment(service) if not key.startswith(ENV_PREFIX)]
        assert not other, f"{name} sets non-TUO_ variables {other}"


def test_tuo_service_environments_load_as_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, service in _tuo_services().items():
        for key in list(os.environ):
            if key.upper().startswith(ENV_PREFIX):
                monkeypatch.delenv(key)
        for key, value in _environment(service).items():
            monkeypatch.setenv(key, _interpolate(value, HOST_ENV))
        settings = Settings()  # raises ValidationError on a bad value (e.g. a log level typo)
        assert urlsplit(settings.require_database_url()).hostname in _services(), name
        if _command(service)[:2] == ["tuo", "run"]:
            assert settings.require_bootstrap_servers(), name


def test_secrets_are_required_from_the_host_environment_not_written_in_the_file() -> None:
    required = {
        ("postgres", "POSTGRES_PASSWORD"): "TUO_POSTGRES_PASSWORD",
        ("intake", "TUO_PSEUDONYM_KEY"): "TUO_PSEUDONYM_KEY",
    }
    for (service_name, key), variable in required.items():
        match = _INTERPOLATION.fullmatch(_environment(_services()[service_name])[key])
        assert match and match.group("name") == variable and match.group("op") == ":?", service_name
    for service in _services().values():
        for key, value in _environment(service).items():
            if re.search(r"PASSWORD|SECRET|_KEY$|DATABASE_URL", key):
                with pytest.raises(LookupError):
                    _interpolate(value, {})  # Compose refuses to start without the variable


def test_database_url_matches_the_postgres_service() -> None:
    postgres = _environment(_services()["postgres"])
    password = _interpolate(postgres["POSTGRES_PASSWORD"], HOST_ENV)
    for name, service in _tuo_services().items():
        url = urlsplit(_interpolate(_environment(service)["TUO_DATABASE_URL"], HOST_ENV))
        assert url.scheme in ("postgresql", "postgres"), name
        assert url.hostname == "postgres", name
        assert url.username == postgres["POSTGRES_USER"], name
        assert url.password == password, name
        assert url.path.lstrip("/") == postgres["POSTGRES_DB"], name


def test_every_tuo_run_names_a_known_component() -> None:
    for name, service in _bus_services().items():
        components = _command(service)[2:]
        assert components, f"{name} runs every component in one container"
        unknown = set(components) - set(COMPONENTS)
        assert not unknown, f"{name} runs unknown components {sorted(unknown)}"


def test_every_component_runs_in_exactly_one_service() -> None:
    ran = [c for service in _bus_services().values() for c in _command(service)[2:]]
    for component in COMPONENTS:
        assert ran.count(component) == 1, f"{component} runs in {ran.count(component)} services"


def test_migrate_runs_once_before_the_bus_starts() -> None:
    migrate = _services()["migrate"]
    assert _command(migrate) == ["tuo", "migrate"]
    assert str(migrate.get("restart", "no")) == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, service in _bus_services().items():
        depends = service.get("depends_on") or {}
        assert depends.get("migrate", {}).get("condition") == "service_completed_successfully", name
        for broker in _brokers():
            assert depends.get(broker, {}).get("condition") == "service_healthy", f"{name} → {broker}"


def test_services_waited_on_for_health_have_a_healthcheck() -> None:
    for name, service in _services().items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in _services(), f"{name} depends on missing {dependency}"
            if spec.get("condition") == "service_healthy":
                check = _services()[dependency].get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), f"{dependency} has no healthcheck"


def test_three_kraft_brokers_each_also_a_controller() -> None:
    brokers = _brokers()
    assert len(brokers) == 3, sorted(brokers)
    assert sorted(int(env["KAFKA_NODE_ID"]) for env in brokers.values()) == [1, 2, 3]
    for name, env in brokers.items():
        assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, name
    assert len({env["CLUSTER_ID"] for env in brokers.values()}) == 1, "brokers disagree on CLUSTER_ID"


def test_controller_quorum_is_the_three_brokers() -> None:
    brokers = _brokers()
    quorums = {env["KAFKA_CONTROLLER_QUORUM_VOTERS"] for env in brokers.values()}
    assert len(quorums) == 1, f"brokers disagree on the quorum: {quorums}"
    voters = {}
    for voter in quorums.pop().split(","):
        node_id, _, address = voter.partition("@")
        host, _, port = address.rpartition(":")
        voters[int(node_id)] = (host, int(port))
    assert len(voters) == 3
    for name, env in brokers.items():
        controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
        expected = (name, _listener_port(env["KAFKA_LISTENERS"], controller))
        assert voters.get(int(env["KAFKA_NODE_ID"])) == expected, name


def test_brokers_replicate_three_ways_with_min_isr_two() -> None:
    expected = {
        "KAFKA_DEFAULT_REPLICATION_FACTOR": "3",
        "KAFKA_MIN_INSYNC_REPLICAS": "2",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "3",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "3",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "2",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
    }
    for name, env in _brokers().items():
        actual = {key: env.get(key, "").lower() for key in expected}
        assert actual == expected, name


def test_bus_services_create_topics_with_replication_factor_three() -> None:
    for name, service in _bus_services().items():
        factor = _environment(service).get("TUO_TOPIC_REPLICATION_FACTOR")
        assert factor == "3", f"{name}: TUO_TOPIC_REPLICATION_FACTOR={factor}"
    assert len(_brokers()) >= 3


def test_bootstrap_servers_are_the_brokers_in_this_file() -> None:
    advertised = {
        f"{name}:{_listener_port(env['KAFKA_ADVERTISED_LISTENERS'], 'PLAINTEXT')}"
        for name, env in _brokers().items()
    }
    for name, service in _tuo_services().items():
        value = _environment(service).get("TUO_KAFKA_BOOTSTRAP_SERVERS")
        if value is None:
            assert name not in _bus_services(), f"{name} has no bootstrap servers"
            continue
        servers = {server.strip() for server in value.split(",")}
        assert servers <= advertised, f"{name} names {sorted(servers - advertised)}, not brokers here"
        assert servers == advertised, f"{name} leaves out brokers {sorted(advertised - servers)}"


def _is_bus_topic(name: str, topics: Topics) -> bool:
    if name in (topics.life_events, topics.routing_decisions, topics.dead_letters):
        return True
    for prefix in (topics.agency(""), topics.receipts("")):
        if name.startswith(prefix):
            agency = name.removeprefix(prefix)
            return re.fullmatch(topics.receipts_pattern(), topics.receipts(agency)) is not None
    return False


def test_topic_names_mentioned_are_ones_the_bus_uses() -> None:
    topics = Topics(TOPIC_PREFIX)
    example_agency = "hmrc"
    mentioned = re.findall(
        rf"(?<![\w.-]){re.escape(TOPIC_PREFIX)}(?:\.(?:[A-Za-z0-9_-]+|<agency>))+", _raw_text()
    )
    wrong = [m for m in mentioned if not _is_bus_topic(m.replace("<agency>", example_agency), topics)]
    assert not wrong, f"not topics that runtime.kafka.Topics produces: {wrong}"


def test_only_intake_is_published_and_only_on_loopback() -> None:
    published = {name for name, service in _services().items() if service.get("ports")}
    assert published == {"intake"}
    intake = _services()["intake"]
    env = _environment(intake)
    # Inside its container intake must listen on every interface, or the published port is dead.
    assert ipaddress.ip_address(env["TUO_HTTP_HOST"]).is_unspecified
    for port in intake["ports"]:
        host_ip, _host_port, container_port = str(port).split(":")
        assert host_ip == "127.0.0.1", port
        assert container_port == env.get("TUO_HTTP_PORT", str(Settings.model_fields["http_port"].default))


def test_tuo_services_are_built_from_the_compose_dockerfile() -> None:
    for name, service in _tuo_services().items():
        build = service.get("build")
        assert isinstance(build, dict), f"{name} is not built from compose/Dockerfile"
        context = (COMPOSE_DIR / build["context"]).resolve()
        assert context == ROOT, name
        assert (context / build["dockerfile"]).resolve() == COMPOSE_DIR / "Dockerfile", name
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.MULTILINE)


def test_dockerfile_copies_every_package_the_project_installs() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*").rstrip(".") for pattern in includes}
    copied = set(re.findall(r"^COPY\s+(?!--)(\S+)\s", (COMPOSE_DIR / "Dockerfile").read_text(), re.MULTILINE))
    assert "pyproject.toml" in copied
    missing = sorted(package for package in packages if package not in copied)
    assert not missing, f"compose/Dockerfile does not copy {missing}"
