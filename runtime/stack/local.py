"""Bring the local stack up and down, and say what state it is in.

Layout under the state directory::

    stack.json        ports, cluster id, database and broker passwords chosen on first start
    stack.env         TUO_* settings for clients (read by runtime.settings)
    kafka-credentials.json   one SCRAM password per component and agency (0600)
    kafka/            server.properties, tls/ (CA and broker certificate), data/ (KRaft
                      log), logs/, kafka.pid
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
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from runtime.access import CredentialsFile, NotInEffect, Principal, component_grants, wait_for_acls
from runtime.kafka_admin import KafkaAdminError, create_acls, new_password, set_scram_password
from runtime.sealing import new_data_key
from runtime.settings import STACK_ENV_FILE
from runtime.stack.kafka import KafkaBroker, ensure_jars, new_cluster_id
from runtime.stack.postgres import PostgresServer, reachable_by_service_user
from runtime.stack.processes import StackError, free_port, port_is_free

__all__ = ["LocalStack", "StackError", "StackStatus"]

SHARED_TMP = "/var/tmp"  # noqa: S108 - survives reboots' /tmp cleaning; paths are random


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

    @classmethod
    def fresh(cls, state_dir: Path) -> StackLayout:
        postgres_home = state_dir / "postgres"
        if not reachable_by_service_user(state_dir):
            # A fresh, unpredictable directory (mode 0700), so nobody can plant a link there.
            postgres_home = Path(tempfile.mkdtemp(prefix="tuo-postgres-", dir=SHARED_TMP))
        return cls(
            postgres_home=str(postgres_home),
            broker_port=free_port(),
            controller_port=free_port(),
            postgres_port=free_port(),
            cluster_id=new_cluster_id(),
            postgres_password=secrets.token_urlsafe(24),
            pseudonym_key=secrets.token_urlsafe(32),
            kafka_super_password=secrets.token_urlsafe(32),
            kafka_keystore_password=secrets.token_urlsafe(24),
            data_key=new_data_key(),
            dev_idp_port=free_port(),
            oidc_client_secret=secrets.token_urlsafe(32),
        )


@dataclass(frozen=True)
class StackStatus:
    state_dir: Path
    kafka_running: bool
    kafka_pid: int | None
    postgres_running: bool
    bootstrap_servers: str | None
    database: str | None  # the DSN without its password

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
        heap: str = "1G",
        topic_prefix: str = "tuo",
    ):
        self.state_dir = state_dir.resolve()
        self.cache_dir = cache_dir.resolve()
        self.kafka_version = kafka_version
        self.heap = heap
        self.topic_prefix = topic_prefix  # the ACLs name the bus's topics

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
            missing = {f.name for f in fields(StackLayout)} - set(recorded)
            if missing and create:
                raise StackError(
                    f"{self.layout_file} was written by an older version (it has no "
                    f"{', '.join(sorted(missing))}); run `tuo stack purge` and start again"
                )
            # Stopping and purging an older stack needs only its ports and directories.
            return StackLayout(**{**dict.fromkeys(missing, ""), **recorded})
        if not create:
            return None
        layout = StackLayout.fresh(self.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Traversable but not listable: the postgres service user must reach postgres/.
        self.state_dir.chmod(0o711)
        _write_private(self.layout_file, json.dumps(asdict(layout), indent=2))
        return layout

    def _kafka(self, layout: StackLayout, libs: Path) -> KafkaBroker:
        return KafkaBroker(
            libs=libs,
            home=self.state_dir / "kafka",
            broker_port=layout.broker_port,
            controller_port=layout.controller_port,
            cluster_id=layout.cluster_id,
            super_password=layout.kafka_super_password,
            keystore_password=layout.kafka_keystore_password,
            heap=self.heap,
        )

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
        for port, name in (
            (layout.broker_port, "Kafka"),
            (layout.controller_port, "Kafka controller"),
            (layout.postgres_port, "PostgreSQL"),
        ):
            owned = kafka.pid() is not None if name.startswith("Kafka") else postgres.is_running()
            if not owned and not port_is_free(port):
                raise StackError(
                    f"port {port} recorded for {name} in {self.layout_file} is in use by another "
                    "process; stop it, or purge the stack to choose new ports"
                )
        postgres.start()
        postgres_done = time.monotonic()
        try:
            kafka.start()
        except StackError:
            postgres.stop()
            raise
        try:
            asyncio.run(grant_bus_components(kafka, self.credentials_file, self.topic_prefix))
        except (KafkaError, KafkaAdminError, NotInEffect, OSError) as exc:
            kafka.stop()
            postgres.stop()
            raise StackError(f"could not set up the bus's Kafka principals and ACLs: {exc}") from exc
        kafka_done = time.monotonic()
        _write_private(
            self.env_file,
            "\n".join(
                [
                    f"TUO_KAFKA_BOOTSTRAP_SERVERS={kafka.bootstrap_servers}",
                    "TUO_KAFKA_SECURITY_PROTOCOL=SASL_SSL",
                    "TUO_KAFKA_SASL_MECHANISM=SCRAM-SHA-512",
                    f"TUO_KAFKA_SSL_CAFILE={kafka.tls.ca_file}",
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
        libs = self.cache_dir / f"kafka-{self.kafka_version}" / "libs"
        self._kafka(layout, libs).stop()
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
        kafka = self._kafka(layout, self.cache_dir)
        postgres = self._postgres(layout)
        pid = kafka.pid()
        return StackStatus(
            state_dir=self.state_dir,
            kafka_running=pid is not None,
            kafka_pid=pid,
            postgres_running=postgres.is_running(),
            bootstrap_servers=kafka.bootstrap_servers,
            database=postgres.dsn.replace(layout.postgres_password, "***"),
        )


def _write_private(path: Path, text: str) -> None:
    """Write a file that holds secrets: mode 0600 from the moment it exists."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # an older file may have had another mode
    with os.fdopen(descriptor, "w") as stream:
        stream.write(text)


async def grant_bus_components(kafka: KafkaBroker, credentials: CredentialsFile, prefix: str) -> None:
    """As the super user: give each component of the bus its principal (a password made
    on first start, kept across restarts) and its ACLs."""
    known = credentials.read()
    fresh = {component.value: new_password() for component in Principal if component.value not in known}
    client = AIOKafkaAdminClient(**kafka.client_options(), client_id="tuo-stack")
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
    for user, password in fresh.items():
        await _wait_until_accepted(kafka, user, password)
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
