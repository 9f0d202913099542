"""Bring the local stack up and down, and say what state it is in.

Layout under the state directory::

    stack.json        ports, cluster id and database password chosen on first start
    stack.env         TUO_* settings for clients (read by runtime.settings)
    kafka/            server.properties, data/ (KRaft log), logs/, kafka.pid
    postgres/         data/ (the cluster), server.log

When we run as root, PostgreSQL runs as the ``postgres`` user, which must be
able to reach its directory; if the state directory lies under one it cannot
enter (``/root`` is 0700), the cluster goes to a fresh ``/var/tmp/tuo-postgres-*``
instead, recorded in stack.json and removed by purge.

The Maven-resolved jars live in a separate cache directory so purging the
state does not download Kafka again.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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
    def __init__(self, state_dir: Path, cache_dir: Path, kafka_version: str, heap: str = "1G"):
        self.state_dir = state_dir.resolve()
        self.cache_dir = cache_dir.resolve()
        self.kafka_version = kafka_version
        self.heap = heap

    @property
    def layout_file(self) -> Path:
        return self.state_dir / "stack.json"

    @property
    def env_file(self) -> Path:
        return self.state_dir / STACK_ENV_FILE

    def _layout(self, create: bool) -> StackLayout | None:
        if self.layout_file.exists():
            return StackLayout(**json.loads(self.layout_file.read_text()))
        if not create:
            return None
        layout = StackLayout.fresh(self.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Traversable but not listable: the postgres service user must reach postgres/.
        self.state_dir.chmod(0o711)
        self.layout_file.write_text(json.dumps(asdict(layout), indent=2))
        self.layout_file.chmod(0o600)
        return layout

    def _kafka(self, layout: StackLayout, libs: Path) -> KafkaBroker:
        return KafkaBroker(
            libs=libs,
            home=self.state_dir / "kafka",
            broker_port=layout.broker_port,
            controller_port=layout.controller_port,
            cluster_id=layout.cluster_id,
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
        kafka_done = time.monotonic()
        self.env_file.write_text(
            "\n".join(
                [
                    f"TUO_KAFKA_BOOTSTRAP_SERVERS={kafka.bootstrap_servers}",
                    f"TUO_DATABASE_URL={postgres.dsn}",
                    f"TUO_PSEUDONYM_KEY={layout.pseudonym_key}",
                    "",
                ]
            )
        )
        self.env_file.chmod(0o600)
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
