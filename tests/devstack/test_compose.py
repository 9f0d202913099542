"""The Docker Compose deployment agrees with the code, checked without Docker.

compose/docker-compose.yml names settings, components, brokers and topics that are
defined elsewhere (runtime.settings, operators.services, runtime.kafka); these tests fail
when the two drift apart. They also hold the file to the bus's Kafka security: SASL_SSL
with SCRAM-SHA-512 and no plaintext listener, deny unless an ACL allows, and each
container holding only its own password (from the volumes compose/generate_secrets.py
fills, which is tested here too).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from compose import generate_secrets
from compose.generate_secrets import PASSWORDS_HELD, PartialSecrets, SecretsLayout
from devstack.certificates import BROKER_COMMON_NAME
from operators.services import COMPONENTS
from router.seed import read_seed
from runtime.access import Principal
from runtime.kafka import Topics
from runtime.kafka_admin import salted_password
from runtime.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
KAFKA_IMAGE = "apache/kafka:"
PROJECT_IMAGE = "tell-us-once:local"
TOPIC_PREFIX = "tuo"
CLIENT_LISTENER = "SASL_SSL"
SUPER_USER = f"User:{BROKER_COMMON_NAME}"
SECRETS_SERVICE = "secrets"
SETUP_SERVICE = "setup"
# Whose Kafka password each `tuo run <component>` may hold: its own principal's only.
COMPONENT_PRINCIPALS: dict[str, frozenset[str]] = {
    "intake": frozenset(),  # writes to PostgreSQL only; the relay publishes
    "relay": frozenset({Principal.RELAY.value}),
    "router": frozenset({Principal.ROUTER.value}),
    "tracker": frozenset({Principal.TRACKER.value}),
    "agencies": frozenset({"agency-*"}),
}
# Values a user would export before `docker compose up`.
HOST_ENV = {
    "TUO_POSTGRES_PASSWORD": "0123abcd" * 4,
    "TUO_PSEUDONYM_KEY": "k" * 40,
    "TUO_DATA_KEY": base64.urlsafe_b64encode(b"d" * 32).decode(),
}
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
        ("intake", "TUO_DATA_KEY"): "TUO_DATA_KEY",
        ("relay", "TUO_DATA_KEY"): "TUO_DATA_KEY",
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
        f"{name}:{_listener_port(env['KAFKA_ADVERTISED_LISTENERS'], CLIENT_LISTENER)}"
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


# --- Kafka security -------------------------------------------------------------------


def _unescape(value: str) -> str:
    """Compose's "$$" is a literal "$"."""
    return value.replace("$$", "$")


def _kafka_property(env: dict[str, str], name: str) -> str:
    """A broker property as compose/start-broker.sh renders it from KAFKA_* variables."""
    variable = "KAFKA_" + name.replace("_", "__").replace("-", "___").replace(".", "_").upper()
    return _unescape(env.get(variable, ""))


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Each mount's target: its source (a named volume, or a path for a bind) and whether
    it is read-only."""
    mounts = {}
    for volume in service.get("volumes") or []:
        source, target, *options = str(volume).split(":")
        mounts[target] = (source, "ro" in options)
    return mounts


def _named_volumes(service: dict[str, Any]) -> set[str]:
    return {source for source, _ in _mounts(service).values() if not source.startswith((".", "/"))}


def _mount_of(service: dict[str, Any], path: str) -> tuple[str, str]:
    """The named volume holding ``path`` in the service's container, and the path inside it."""
    for target, (source, _) in _mounts(service).items():
        if path.startswith(target.rstrip("/") + "/"):
            return source, path.removeprefix(target.rstrip("/") + "/")
    raise AssertionError(f"{path} is on no mounted volume")


def _script_variable(script: Path, name: str) -> str:
    match = re.search(rf"^{name}=(\S+)$", script.read_text(), re.MULTILINE)
    assert match, f"{script.name} does not set {name}"
    return match.group(1)


def _mapped_principal(rules: str, distinguished_name: str) -> str | None:
    """What Kafka's ssl.principal.mapping.rules make of a certificate subject (the
    subset of the syntax this file uses: RULE:pattern/replacement/ rules, then DEFAULT)."""
    for rule in re.findall(r"RULE:.*?/.*?/[LU]?(?=,RULE:|,DEFAULT|$)", rules):
        pattern, replacement, _flags = rule.removeprefix("RULE:").rsplit("/", 2)
        match = re.fullmatch(pattern, distinguished_name)
        if match:
            return match.expand(re.sub(r"\$(\d)", r"\\\1", replacement))
    return distinguished_name if rules.endswith("DEFAULT") else None


def _generated(tmp_path: Path, brokers: tuple[str, ...] = ("kafka-1", "kafka-2")) -> SecretsLayout:
    layout = SecretsLayout(tmp_path / "secrets", brokers)
    assert generate_secrets.generate(layout, broker_uid=os.geteuid(), bus_uid=os.geteuid())
    return layout


def _read_json(path: Path) -> dict[str, str]:
    loaded = json.loads(path.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _strings(node: object) -> Iterator[str]:
    """Every key and value in the parsed compose file (comments are not in it)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)
    else:
        yield str(node)


def test_no_listener_is_plaintext() -> None:
    assert not [text for text in _strings(_compose()) if "PLAINTEXT" in text]  # SASL_PLAINTEXT too
    for name, env in _brokers().items():
        protocols = dict(entry.split(":") for entry in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
        for variable in ("KAFKA_LISTENERS", "KAFKA_ADVERTISED_LISTENERS"):
            for listener in env[variable].split(","):
                listener_name = listener.partition("://")[0]
                assert protocols.get(listener_name) in ("SASL_SSL", "SSL"), f"{name}: {listener}"
        assert "PLAINTEXT" not in "".join(env.values()), name


def test_clients_and_brokers_use_scram_over_tls_and_controllers_require_certificates() -> None:
    for name, env in _brokers().items():
        protocols = dict(entry.split(":") for entry in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
        assert protocols[env["KAFKA_INTER_BROKER_LISTENER_NAME"]] == "SASL_SSL", name
        assert _kafka_property(env, "sasl.enabled.mechanisms") == "SCRAM-SHA-512", name
        assert _kafka_property(env, "sasl.mechanism.inter.broker.protocol") == "SCRAM-SHA-512", name
        controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
        assert protocols[controller] == "SSL", name
        assert _kafka_property(env, f"listener.name.{controller.lower()}.ssl.client.auth") == "required"


def test_every_broker_denies_what_no_acl_allows() -> None:
    for name, env in _brokers().items():
        assert (
            _kafka_property(env, "authorizer.class.name")
            == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
        ), name
        assert _kafka_property(env, "allow.everyone.if.no.acl.found") == "false", name
        assert _kafka_property(env, "super.users") == SUPER_USER, name
        assert _kafka_property(env, "auto.create.topics.enable") == "false", name


def test_a_brokers_certificate_makes_it_the_super_user_on_the_controller_listener(tmp_path: Path) -> None:
    layout = _generated(tmp_path, ("kafka-1",))
    _key, certificate, _chain = pkcs12.load_key_and_certificates(
        layout.keystore("kafka-1").read_bytes(),
        (layout.directory("kafka-tls") / "keystore-password").read_bytes(),
    )
    assert certificate is not None
    subject = certificate.subject.rfc4514_string()  # Kafka sees the subject in this form
    for name, env in _brokers().items():
        rules = _kafka_property(env, "ssl.principal.mapping.rules")
        assert f"User:{_mapped_principal(rules, subject)}" == SUPER_USER, name
    script = COMPOSE_DIR / "start-broker.sh"
    assert f"User:{_script_variable(script, 'SUPER_USER')}" == SUPER_USER


def test_each_broker_presents_its_own_certificate_and_trusts_the_clusters_ca() -> None:
    secrets_command = _command(_services()[SECRETS_SERVICE])
    brokers_index = secrets_command.index("--brokers")
    assert sorted(secrets_command[brokers_index + 1 :]) == sorted(_brokers())
    script = COMPOSE_DIR / "start-broker.sh"
    tls_dir = _script_variable(script, "TLS")
    for name, env in _brokers().items():
        service = _services()[name]
        assert _mount_of(service, _kafka_property(env, "ssl.keystore.location")) == (
            "kafka-tls",
            f"{name}.p12",
        )
        assert _kafka_property(env, "ssl.truststore.type") == "PEM"
        assert _mount_of(service, _kafka_property(env, "ssl.truststore.location")) == ("kafka-tls", "ca.pem")
        assert _mount_of(service, f"{tls_dir}/keystore-password") == ("kafka-tls", "keystore-password")
        assert _mounts(service)[tls_dir][1], f"{name} may write its TLS volume"


def test_brokers_format_their_storage_with_scram_credentials_by_the_mounted_script() -> None:
    script = COMPOSE_DIR / "start-broker.sh"
    text = script.read_text()
    credentials_dir = _script_variable(script, "CREDENTIALS")
    assert "--add-scram" in text and "$CREDENTIALS/scram-credentials" in text
    for name in _brokers():
        service = _services()[name]
        command = _command(service)
        assert command[0] == "sh", name
        source, read_only = _mounts(service)[command[1]]
        assert read_only and (COMPOSE_DIR / source).resolve() == script, name
        assert _mount_of(service, f"{credentials_dir}/scram-credentials") == (
            "broker-credentials",
            "scram-credentials",
        )
        assert _mounts(service)[credentials_dir][1], f"{name} may write its credentials volume"
    if shutil.which("sh"):
        subprocess.run(["sh", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_the_start_script_renders_the_kafka_variables_as_broker_properties() -> None:
    script = (COMPOSE_DIR / "start-broker.sh").read_text()
    functions = re.search(
        r"^not_a_property\(\) \{$.*?^\}$.*?^properties_from_environment\(\) \{$.*?^\}$",
        script,
        re.MULTILINE | re.DOTALL,
    )
    assert functions, "start-broker.sh no longer defines properties_from_environment"
    for name, env in _brokers().items():
        rendered = subprocess.run(
            ["sh", "-c", functions.group(0) + "\nproperties_from_environment"],
            env={"PATH": os.environ["PATH"], "KAFKA_HEAP_OPTS": "-Xmx1G"}
            | {key: _unescape(value) for key, value in env.items()},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        properties = dict(line.split("=", 1) for line in rendered.splitlines())
        expected = {
            key.removeprefix("KAFKA_").lower().replace("_", "."): _unescape(value)
            for key, value in env.items()
            if key.startswith("KAFKA_")
        }
        assert properties == expected, name  # no variable here needs the __ or ___ escapes
        assert properties["ssl.principal.mapping.rules"] == "RULE:^CN=([^,]+),.*$/$1/,DEFAULT"


def test_broker_healthchecks_authenticate_over_sasl_ssl() -> None:
    script = (COMPOSE_DIR / "start-broker.sh").read_text()
    config_dir = _script_variable(COMPOSE_DIR / "start-broker.sh", "CONFIG")
    client = re.search(r"\{\n(.*?)\n\} *>\"\$CONFIG/client\.properties\"", script, re.DOTALL)
    assert client, "start-broker.sh writes no client.properties"
    assert 'echo "security.protocol=SASL_SSL"' in client.group(1)
    assert 'echo "sasl.mechanism=SCRAM-SHA-512"' in client.group(1)
    for name in _brokers():
        service = _services()[name]
        test = " ".join(service["healthcheck"]["test"])
        assert f"--command-config {config_dir}/client.properties" in test, name
        # The rendered files hold passwords: kept in memory, not in the container's layer.
        assert config_dir in (service.get("tmpfs") or []), name


def test_every_bus_service_uses_sasl_ssl_and_trusts_only_the_clusters_ca() -> None:
    kafka_users = {**_bus_services(), SETUP_SERVICE: _services()[SETUP_SERVICE]}
    for name, service in kafka_users.items():
        env = _environment(service)
        assert env.get("TUO_KAFKA_SECURITY_PROTOCOL") == "SASL_SSL", name
        assert env.get("TUO_KAFKA_SASL_MECHANISM") == "SCRAM-SHA-512", name
        assert _mount_of(service, env["TUO_KAFKA_SSL_CAFILE"]) == ("kafka-ca", "ca.pem"), name
        assert _mounts(service)[str(Path(env["TUO_KAFKA_SSL_CAFILE"]).parent)][1], name


def _passwords_readable(service: dict[str, Any]) -> set[str]:
    held = {p for volume in _named_volumes(service) for p in PASSWORDS_HELD.get(volume, frozenset())}
    if _environment(service).get("TUO_KAFKA_SASL_PASSWORD"):
        held.add(_environment(service).get("TUO_KAFKA_SASL_USERNAME", "?"))
    return held


def test_no_service_holds_another_components_password() -> None:
    for name, service in _bus_services().items():
        (component,) = _command(service)[2:]
        assert _passwords_readable(service) == COMPONENT_PRINCIPALS[component], name
        env = _environment(service)
        if COMPONENT_PRINCIPALS[component]:
            volume, file = _mount_of(service, env["TUO_KAFKA_CREDENTIALS_FILE"])
            assert file == "credentials.json" and PASSWORDS_HELD[volume] == COMPONENT_PRINCIPALS[component]
            assert _mounts(service)[str(Path(env["TUO_KAFKA_CREDENTIALS_FILE"]).parent)][1], name
        else:
            assert "TUO_KAFKA_CREDENTIALS_FILE" not in env, name
    everyone = {p for held in PASSWORDS_HELD.values() for p in held}
    expected = {
        SECRETS_SERVICE: everyone,
        SETUP_SERVICE: {BROKER_COMMON_NAME, Principal.OPERATOR.value, "agency-*"},
        **{name: {BROKER_COMMON_NAME} for name in _brokers()},
    }
    for name, service in _services().items():
        if name not in _bus_services():
            assert _passwords_readable(service) == expected.get(name, set()), name


def test_secrets_come_from_the_secrets_volumes_or_the_host_environment() -> None:
    secrets_service = _services()[SECRETS_SERVICE]
    assert set(PASSWORDS_HELD) == _named_volumes(secrets_service)
    for volume in PASSWORDS_HELD:
        assert _mounts(secrets_service)[f"/secrets/{volume}"] == (volume, False)
    declared = set(_compose().get("volumes") or {})
    for name, service in _services().items():
        assert _named_volumes(service) <= declared, name
        for key, value in _environment(service).items():
            assert not re.search(r"PASSWORD|JAAS|SECRET", key) or value.startswith("${"), f"{name}: {key}"
            assert "password=" not in value.lower(), f"{name}: {key}"
    for env in _brokers().values():
        assert not [key for key in env if re.search("PASSWORD|JAAS", key)], "broker secrets in the env"
    # The application's own keys go only where they are used.
    for key, users in {"TUO_PSEUDONYM_KEY": {"intake"}, "TUO_DATA_KEY": {"intake", "relay"}}.items():
        assert {name for name, service in _services().items() if key in _environment(service)} == users


def test_the_secrets_service_runs_first_offline_and_writes_for_the_containers_users() -> None:
    service = _services()[SECRETS_SERVICE]
    assert service["image"] == PROJECT_IMAGE and str(service.get("restart")) == "no"
    assert service.get("network_mode") == "none"
    command = _command(service)
    assert command[:2] == ["python", "/opt/tuo/generate_secrets.py"]
    options = dict(
        arg.removeprefix("--").split("=", 1) for arg in command if arg.startswith("--") and "=" in arg
    )
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    assert re.search(rf"useradd\b.*--uid {options['bus-uid']} tuo", dockerfile)
    assert re.search(r"^COPY compose/generate_secrets\.py .*/opt/tuo/$", dockerfile, re.MULTILINE)
    assert options["into"] == "/secrets"
    for name, service in _services().items():
        if name != SECRETS_SERVICE and _named_volumes(service) & set(PASSWORDS_HELD):
            assert SECRETS_SERVICE in _started_after(name), f"{name} may start before its secrets exist"


def _started_after(name: str) -> set[str]:
    """The services that Compose starts ``name`` after (they completed, or are healthy)."""
    waits = {
        dependency
        for dependency, spec in (_services()[name].get("depends_on") or {}).items()
        if spec.get("condition") in ("service_completed_successfully", "service_healthy")
    }
    return waits.union(*(_started_after(dependency) for dependency in waits))


def test_setup_grants_access_and_onboards_the_reference_agencies_before_the_bus_starts() -> None:
    setup = _services()[SETUP_SERVICE]
    assert str(setup.get("restart")) == "no" and setup["image"] == PROJECT_IMAGE
    depends = setup["depends_on"]
    assert depends["migrate"]["condition"] == "service_completed_successfully"
    for broker in _brokers():
        assert depends[broker]["condition"] == "service_healthy", broker
    for name, service in _bus_services().items():
        condition = (service.get("depends_on") or {}).get(SETUP_SERVICE, {}).get("condition")
        assert condition == "service_completed_successfully", name

    script = COMPOSE_DIR / "setup-bus.sh"
    assert setup["entrypoint"] == ["sh", "/opt/tuo/setup-bus.sh"]
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    assert re.search(r"^COPY .*compose/setup-bus\.sh /opt/tuo/$", dockerfile, re.MULTILINE)
    command = _command(setup)
    assert command[0] == "--reference-agencies"
    assert sorted(command[1:]) == sorted({s["agency"] for s in read_seed()})
    text = script.read_text()
    assert "tuo access grant" in text and "tuo agencies add" in text
    unknown = set(re.findall(r"\bTUO_[A-Z_]+", text)) - _settings_env_names()
    assert not unknown, f"setup-bus.sh sets variables Settings does not know: {sorted(unknown)}"

    secrets_dir = _script_variable(script, "SECRETS")
    assert _mounts(setup)[secrets_dir] == ("setup-credentials", True)
    agencies_file = _script_variable(script, "AGENCIES_CREDENTIALS")
    assert _mount_of(setup, agencies_file) == ("agencies-credentials", "credentials.json")
    assert not _mounts(setup)[str(Path(agencies_file).parent)][1], "setup must write the agencies' passwords"
    agencies = _services()["agencies"]
    assert _mount_of(agencies, _environment(agencies)["TUO_KAFKA_CREDENTIALS_FILE"]) == (
        "agencies-credentials",
        "credentials.json",
    )
    if shutil.which("sh"):
        subprocess.run(["sh", "-n", str(script)], check=True)


# --- compose/generate_secrets.py -------------------------------------------------------


def test_generated_keystores_are_valid_for_their_brokers_names_and_signed_by_the_ca(tmp_path: Path) -> None:
    layout = _generated(tmp_path)
    ca = x509.load_pem_x509_certificate((layout.directory("kafka-ca") / "ca.pem").read_bytes())
    assert (layout.directory("kafka-tls") / "ca.pem").read_bytes() == (
        layout.directory("kafka-ca") / "ca.pem"
    ).read_bytes()
    password = (layout.directory("kafka-tls") / "keystore-password").read_bytes()
    for broker in layout.brokers:
        key, certificate, chain = pkcs12.load_key_and_certificates(
            layout.keystore(broker).read_bytes(), password
        )
        assert key is not None and certificate is not None
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == [broker]
        assert names.get_values_for_type(x509.IPAddress) == []
        common_name = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert common_name == BROKER_COMMON_NAME
        certificate.verify_directly_issued_by(ca)
        assert chain == [ca]


def test_each_credentials_file_names_only_its_own_principal(tmp_path: Path) -> None:
    layout = _generated(tmp_path)
    for directory, principal in generate_secrets.COMPONENT_DIRECTORIES.items():
        assert set(_read_json(layout.credentials(directory))) == {principal.value}, directory
        assert PASSWORDS_HELD[directory] == {principal.value}
    assert _read_json(layout.credentials("agencies-credentials")) == {}
    for path in layout.files():
        if path.parent.name != "kafka-ca":
            assert path.stat().st_mode & 0o777 == 0o600, path
            assert path.parent.stat().st_mode & 0o777 == 0o700, path.parent


def test_the_brokers_scram_records_accept_each_users_password(tmp_path: Path) -> None:
    layout = _generated(tmp_path)
    passwords = {
        BROKER_COMMON_NAME: (layout.directory("broker-credentials") / "broker-password").read_text(),
        Principal.OPERATOR.value: (layout.directory("setup-credentials") / "operator-password").read_text(),
    }
    assert (layout.directory("setup-credentials") / "broker-password").read_text() == passwords[
        BROKER_COMMON_NAME
    ]
    for directory in generate_secrets.COMPONENT_DIRECTORIES:
        passwords.update(_read_json(layout.credentials(directory)))
    records = (layout.directory("broker-credentials") / "scram-credentials").read_text().splitlines()
    record = re.compile(
        r"SCRAM-SHA-512=\[name=(?P<name>[\w-]+),iterations=(?P<iterations>\d+),"
        r'salt="(?P<salt>[^"]+)",saltedpassword="(?P<salted>[^"]+)"\]'
    )
    accepted = {}
    for line in records:
        match = record.fullmatch(line)
        assert match, line
        salted = salted_password(
            passwords[match["name"]], base64.b64decode(match["salt"]), int(match["iterations"])
        )
        accepted[match["name"]] = salted == base64.b64decode(match["salted"])
    assert accepted == {user: True for user in passwords}
    assert set(passwords) == {BROKER_COMMON_NAME, *(p.value for p in Principal)}


def test_generating_again_changes_nothing(tmp_path: Path) -> None:
    layout = _generated(tmp_path)
    before = {path: path.read_bytes() for path in layout.files()}
    assert not generate_secrets.generate(layout, broker_uid=os.geteuid(), bus_uid=os.geteuid())
    assert {path: path.read_bytes() for path in layout.files()} == before


def test_a_partly_missing_set_of_secrets_is_refused_not_replaced(tmp_path: Path) -> None:
    layout = _generated(tmp_path)
    lost = layout.credentials("relay-credentials")
    lost.unlink()
    with pytest.raises(PartialSecrets, match="relay-credentials"):
        generate_secrets.generate(layout, broker_uid=os.geteuid(), bus_uid=os.geteuid())
    assert (
        generate_secrets.main(
            ["--into", str(layout.root), "--brokers", *layout.brokers, "--broker-uid", "0", "--bus-uid", "0"]
        )
        == 1
    )
    assert not lost.exists()
