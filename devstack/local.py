"""Bring the local stack up and down, and say what state it is in.

Layout under the state directory::

    stack.json        ports, cluster id, database and broker passwords chosen on first start
    stack.env         TUO_* settings for clients (read by runtime.settings)
    kafka-credentials.json   one SCRAM password per component and agency (0600)
    kafka/            server.properties, tls/ (CA and broker certificate), data/ (KRaft
                      log), logs/, kafka.pid
                      with three brokers (``tuo stack up --brokers 3``): tls/ shared by
                      all, and node-1/, node-2/, node-3/, each with the rest
    postgres/         data/ (the cluster), server.log

When we run as root, PostgreSQL runs as the ``postgres`` user, which must be
able to reach its directory; if the state directory lies under one it cannot
enter (``/root`` is 0700), the cluster goes to a fresh ``/var/tmp/tuo-postgres-*``
instead, recorded in stack.json and removed by purge.

The Maven-resolved jars live in a separate cache directory so purging the
state does not download Kafka again.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from devstack.kafka import ControllerVoter, KafkaBroker, ensure_jars, new_cluster_id
from devstack.postgres import PostgresServer, reachable_by_service_user
from devstack.processes import StackError, free_port, port_is_free
from runtime.access import CredentialsFile, NotInEffect, Principal, component_grants, wait_for_acls
from runtime.kafka_admin import KafkaAdminError, create_acls, new_password, set_scram_password
from runtime.sealing import new_data_key
from runtime.settings import STACK_ENV_FILE

__all__ = ["LocalStack", "StackError", "StackStatus"]

SHARED_TMP = "/var/tmp"  # noqa: S108 - survives reboots' /tmp cleaning; paths are random
BROKER_COUNTS = (1, 3)  # one node, or a cluster that keeps working with one node down
# Three JVMs share a developer's machine: less heap each unless TUO_KAFKA_HEAP says otherwise.
DEFAULT_HEAP = {1: "1G", 3: "512M"}


@dataclass(frozen=True)
class StackLayout:
    broker_port: int
    controller_port: int
    postgres_port: int
    cluster_id: str
    postgres_password: str
    pseudonym_key: str
    postgres_home: str
    kafka_super_password: str
    kafka_keystore_password: str
    data_key: str
    dev_idp_port: int  # the development identity provider citizens sign in with
    oidc_client_secret: str
    # With more than one broker: every node (node 1's ports are the two above too).
    # Empty: the single node, as stacks made before there was a choice recorded it.
    kafka_nodes: tuple[ControllerVoter, ...] = ()
    broker_ports: tuple[int, ...] = ()  # the client port of each of kafka_nodes

    @property
    def brokers(self) -> int:
        return len(self.kafka_nodes) or 1

    @classmethod
    def fresh(cls, state_dir: Path, brokers: int = 1) -> StackLayout:
        postgres_home = state_dir / "postgres"
        if not reachable_by_service_user(state_dir):
            # A fresh, unpredictable directory (mode 0700), so nobody can plant a link there.
            postgres_home = Path(tempfile.mkdtemp(prefix="tuo-postgres-", dir=SHARED_TMP))
        nodes: tuple[ControllerVoter, ...] = ()
        broker_ports: tuple[int, ...] = ()
        if brokers > 1:
            nodes = tuple(ControllerVoter(n, free_port(), new_cluster_id()) for n in range(1, brokers + 1))
            broker_ports = tuple(free_port() for _ in nodes)
        return cls(
            postgres_home=str(postgres_home),
            broker_port=broker_ports[0] if broker_ports else free_port(),
            controller_port=nodes[0].controller_port if nodes else free_port(),
            postgres_port=free_port(),
            cluster_id=new_cluster_id(),
            postgres_password=secrets.token_urlsafe(24),
            pseudonym_key=secrets.token_urlsafe(32),
            kafka_super_password=secrets.token_urlsafe(32),
            kafka_keystore_password=secrets.token_urlsafe(24),
            data_key=new_data_key(),
            dev_idp_port=free_port(),
            oidc_client_secret=secrets.token_urlsafe(32),
            kafka_nodes=nodes,
            broker_ports=broker_ports,
        )

    @classmethod
    def from_json(cls, recorded: dict[str, Any]) -> StackLayout:
        return cls(
            **{
                **recorded,
                "kafka_nodes": tuple(ControllerVoter(**node) for node in recorded.get("kafka_nodes", ())),
                "broker_ports": tuple(recorded.get("broker_ports", ())),
            }
        )


@dataclass(frozen=True)
class StackStatus:
    state_dir: Path
    kafka_running: bool  # every broker of it
    kafka_pid: int | None  # node 1's
    postgres_running: bool
    bootstrap_servers: str | None
    database: str | None  # the DSN without its password
    broker_pids: dict[int, int | None] = field(default_factory=dict)  # by node id

    @property
    def running(self) -> bool:
        return self.kafka_running and self.postgres_running


@dataclass
class StartTimes:
    jars_seconds: float
    kafka_seconds: float
    postgres_seconds: float


class LocalStack:
    def __init__(
        self,
        state_dir: Path,
        cache_dir: Path,
        kafka_version: str,
        heap: str | None = None,
        topic_prefix: str = "tuo",
        brokers: int | None = None,
    ):
        """``brokers``: 1 or 3 for a new stack; unset, or the number an existing stack
        was made with. ``heap`` is each broker's; unset: 1G for one, 512M each for three."""
        if brokers is not None and brokers not in BROKER_COUNTS:
            raise StackError(f"the local stack runs 1 or 3 Kafka brokers, not {brokers}")
        self.state_dir = state_dir.resolve()
        self.cache_dir = cache_dir.resolve()
        self.kafka_version = kafka_version
        self.heap = heap
        self.topic_prefix = topic_prefix  # the ACLs name the bus's topics
        self.brokers = brokers

    @property
    def layout_file(self) -> Path:
        return self.state_dir / "stack.json"

    @property
    def env_file(self) -> Path:
        return self.state_dir / STACK_ENV_FILE

    @property
    def credentials_file(self) -> CredentialsFile:
        return CredentialsFile(self.state_dir / "kafka-credentials.json")

    def _layout(self, create: bool) -> StackLayout | None:
        if self.layout_file.exists():
            recorded = json.loads(self.layout_file.read_text())
            required = {f.name for f in fields(StackLayout) if f.default is MISSING}
            missing = required - set(recorded)
            if missing and create:
                raise StackError(
                    f"{self.layout_file} was written by an older version (it has no "
                    f"{', '.join(sorted(missing))}); run `tuo stack purge` and start again"
                )
            # Stopping and purging an older stack needs only its ports and directories.
            layout = StackLayout.from_json({**dict.fromkeys(missing, ""), **recorded})
            if create and self.brokers is not None and self.brokers != layout.brokers:
                raise StackError(
                    f"the stack in {self.state_dir} was made with {layout.brokers} Kafka "
                    f"broker(s), not {self.brokers}; run `tuo stack purge` to start it afresh"
                )
            return layout
        if not create:
            return None
        layout = StackLayout.fresh(self.state_dir, self.brokers or 1)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Traversable but not listable: the postgres service user must reach postgres/.
        self.state_dir.chmod(0o711)
        _write_private(self.layout_file, json.dumps(asdict(layout), indent=2))
        return layout

    def _kafka(self, layout: StackLayout, libs: Path) -> list[KafkaBroker]:
        """The stack's Kafka nodes, node 1 first."""
        heap = self.heap or DEFAULT_HEAP[layout.brokers]
        if not layout.kafka_nodes:
            return [
                KafkaBroker(
                    libs=libs,
                    home=self.state_dir / "kafka",
                    broker_port=layout.broker_port,
                    controller_port=layout.controller_port,
                    cluster_id=layout.cluster_id,
                    super_password=layout.kafka_super_password,
                    keystore_password=layout.kafka_keystore_password,
                    heap=heap,
                )
            ]
        return [
            KafkaBroker(
                libs=libs,
                home=self.state_dir / "kafka" / f"node-{node.node_id}",
                broker_port=broker_port,
                controller_port=node.controller_port,
                cluster_id=layout.cluster_id,
                super_password=layout.kafka_super_password,
                keystore_password=layout.kafka_keystore_password,
                heap=heap,
                node_id=node.node_id,
                voters=layout.kafka_nodes,
                tls_dir=self.state_dir / "kafka" / "tls",
            )
            for node, broker_port in zip(layout.kafka_nodes, layout.broker_ports, strict=True)
        ]

    def _libs(self) -> Path:
        return self.cache_dir / f"kafka-{self.kafka_version}" / "libs"

    def _broker(self, node_id: int) -> KafkaBroker:
        layout = self._layout(create=False)
        if layout is None:
            raise StackError(f"there is no stack in {self.state_dir}")
        for broker in self._kafka(layout, self._libs()):
            if broker.node_id == node_id:
                return broker
        raise StackError(f"the stack in {self.state_dir} has no Kafka node {node_id}")

    def kill_broker(self, node_id: int) -> None:
        """SIGKILL one Kafka node (a crash, for fault tests); its data stays."""
        self._broker(node_id).kill()

    def start_broker(self, node_id: int, timeout: float = 90.0) -> None:
        """Start one Kafka node again and wait until it answers clients."""
        self._broker(node_id).start(timeout)

    def _postgres(self, layout: StackLayout) -> PostgresServer:
        return PostgresServer(
            home=Path(layout.postgres_home),
            port=layout.postgres_port,
            password=layout.postgres_password,
        )

    def up(self) -> StartTimes:
        """Start both servers (idempotent) and write the client settings file."""
        layout = self._layout(create=True)
        assert layout is not None
        started = time.monotonic()
        libs = ensure_jars(self.cache_dir, self.kafka_version)
        jars_done = time.monotonic()
        kafka = self._kafka(layout, libs)
        postgres = self._postgres(layout)
        ports = [(postgres.port, "PostgreSQL", postgres.is_running())]
        for broker in kafka:
            owned = broker.pid() is not None
            ports.append((broker.broker_port, f"Kafka broker {broker.node_id}", owned))
            ports.append((broker.controller_port, f"Kafka controller {broker.node_id}", owned))
        for port, name, owned in ports:
            if not owned and not port_is_free(port):
                raise StackError(
                    f"port {port} recorded for {name} in {self.layout_file} is in use by another "
                    "process; stop it, or purge the stack to choose new ports"
                )
        postgres.start()
        postgres_done = time.monotonic()
        try:
            _start_cluster(kafka)
        except StackError:
            _stop_cluster(kafka)
            postgres.stop()
            raise
        try:
            asyncio.run(grant_bus_components(kafka, self.credentials_file, self.topic_prefix))
        except (KafkaError, KafkaAdminError, NotInEffect, OSError) as exc:
            _stop_cluster(kafka)
            postgres.stop()
            raise StackError(f"could not set up the bus's Kafka principals and ACLs: {exc}") from exc
        kafka_done = time.monotonic()
        _write_private(
            self.env_file,
            "\n".join(
                [
                    f"TUO_KAFKA_BOOTSTRAP_SERVERS={_bootstrap_servers(kafka)}",
                    f"TUO_TOPIC_REPLICATION_FACTOR={kafka[0].replicas}",
                    "TUO_KAFKA_SECURITY_PROTOCOL=SASL_SSL",
                    "TUO_KAFKA_SASL_MECHANISM=SCRAM-SHA-512",
                    f"TUO_KAFKA_SSL_CAFILE={kafka[0].tls.ca_file}",
                    f"TUO_KAFKA_CREDENTIALS_FILE={self.credentials_file.path}",
                    f"TUO_DATABASE_URL={postgres.dsn}",
                    f"TUO_PSEUDONYM_KEY={layout.pseudonym_key}",
                    f"TUO_DATA_KEY={layout.data_key}",
                    # Citizens sign in at a development identity provider that `tuo run`
                    # starts with test identities; a real deployment names its provider.
                    f"TUO_DEV_IDP_PORT={layout.dev_idp_port}",
                    f"TUO_OIDC_ISSUER=http://127.0.0.1:{layout.dev_idp_port}",
                    "TUO_OIDC_CLIENT_ID=tuo-local",
                    f"TUO_OIDC_CLIENT_SECRET={layout.oidc_client_secret}",
                    "",
                ]
            ),
        )
        return StartTimes(
            jars_seconds=jars_done - started,
            postgres_seconds=postgres_done - jars_done,
            kafka_seconds=kafka_done - postgres_done,
        )

    def down(self) -> None:
        layout = self._layout(create=False)
        if layout is None:
            return
        _stop_cluster(self._kafka(layout, self._libs()))
        self._postgres(layout).stop()
        self.env_file.unlink(missing_ok=True)

    def purge(self) -> None:
        """Stop everything and delete all data; the jar cache is kept."""
        layout = self._layout(create=False)
        self.down()
        if layout is not None:
            shutil.rmtree(layout.postgres_home, ignore_errors=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def status(self) -> StackStatus:
        layout = self._layout(create=False)
        if layout is None:
            return StackStatus(self.state_dir, False, None, False, None, None)
        kafka = self._kafka(layout, self._libs())
        postgres = self._postgres(layout)
        pids = {broker.node_id: broker.pid() for broker in kafka}
        return StackStatus(
            state_dir=self.state_dir,
            kafka_running=None not in pids.values(),
            kafka_pid=pids[kafka[0].node_id],
            postgres_running=postgres.is_running(),
            bootstrap_servers=_bootstrap_servers(kafka),
            database=postgres.dsn.replace(layout.postgres_password, "***"),
            broker_pids=pids,
        )


def _bootstrap_servers(kafka: Sequence[KafkaBroker]) -> str:
    return ",".join(broker.bootstrap_servers for broker in kafka)


def _start_cluster(kafka: Sequence[KafkaBroker]) -> None:
    """Launch every node, then wait for each: no node of a cluster is ready before a
    majority of its controllers runs."""
    if len(kafka) > 1:
        home = kafka[0].home.parent
        home.mkdir(parents=True, exist_ok=True)
        home.chmod(0o700)  # the CA's key lives under it
        kafka[0].tls  # noqa: B018 - the shared CA and certificate, made once before the nodes use them
        # Formatting starts a JVM per node: side by side, not one after another.
        with ThreadPoolExecutor(len(kafka)) as formatting:
            list(formatting.map(KafkaBroker.prepare_storage, kafka))
    launched = [(broker, broker.launch()) for broker in kafka]
    for broker, pid in launched:
        broker.wait_ready(pid)


def _stop_cluster(kafka: Sequence[KafkaBroker]) -> None:
    """Stop every node at once: a node's controlled shutdown needs the controller quorum,
    so the last node standing of a one-after-another stop would wait out its grace time."""
    if len(kafka) == 1:
        kafka[0].stop()
        return
    with ThreadPoolExecutor(len(kafka)) as stopping:
        list(stopping.map(KafkaBroker.stop, kafka))


def _write_private(path: Path, text: str) -> None:
    """Write a file that holds secrets: mode 0600 from the moment it exists."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # an older file may have had another mode
    with os.fdopen(descriptor, "w") as stream:
        stream.write(text)


async def grant_bus_components(
    kafka: Sequence[KafkaBroker], credentials: CredentialsFile, prefix: str
) -> None:
    """As the super user: give each component of the bus its principal (a password made
    on first start, kept across restarts) and its ACLs."""
    known = credentials.read()
    fresh = {component.value: new_password() for component in Principal if component.value not in known}
    options = {**kafka[0].client_options(), "bootstrap_servers": _bootstrap_servers(kafka)}
    client = AIOKafkaAdminClient(**options, client_id="tuo-stack")
    await client.start()
    try:
        for user, password in fresh.items():
            await set_scram_password(client, user, password)
        for component in Principal:
            grants = component_grants(component, prefix)
            await create_acls(client, grants)
            await wait_for_acls(client, f"User:{component}", grants)
    finally:
        await client.close()
    # Each broker learns of a new password from the metadata log in its own time.
    for broker in kafka:
        for user, password in fresh.items():
            await _wait_until_accepted(broker, user, password)
    credentials.update(dict(fresh))


async def _wait_until_accepted(kafka: KafkaBroker, user: str, password: str) -> None:
    deadline = time.monotonic() + 30
    options = {**kafka.client_options(), "sasl_plain_username": user, "sasl_plain_password": password}
    while True:
        client = AIOKafkaAdminClient(**options, client_id="tuo-stack")
        try:
            await client.start()
            return
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
        finally:
            await client.close()
