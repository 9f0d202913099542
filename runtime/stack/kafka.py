"""A single-node KRaft Apache Kafka broker from Maven Central jars."""

from __future__ import annotations

import asyncio
import base64
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from runtime.stack.processes import (
    StackError,
    command_line,
    pid_alive,
    port_accepts,
    read_pid,
    tail,
    terminate,
)

HERE = Path(__file__).parent
POM = HERE / "kafka-pom.xml"
LOG_CONFIG = HERE / "kafka-log4j2.properties"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"


def new_cluster_id() -> str:
    """Kafka's cluster id format: a UUID as unpadded URL-safe base64."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


def ensure_jars(cache_dir: Path, version: str) -> Path:
    """Resolve the broker's jars with Maven once per version; later calls are free."""
    # Absolute: Maven resolves a relative output directory against the POM's folder.
    libs = cache_dir.resolve() / f"kafka-{version}" / "libs"
    marker = libs.parent / "complete"
    if marker.exists():
        return libs
    if shutil.which("mvn") is None:
        raise StackError("Maven (mvn) is not installed; run scripts/setup.sh first")
    shutil.rmtree(libs, ignore_errors=True)
    libs.mkdir(parents=True)
    result = subprocess.run(
        [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(POM),
            f"-Dkafka.version={version}",
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={libs}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(
            f"Maven could not resolve Apache Kafka {version}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    if not list(libs.glob(f"kafka_2.13-{version}.jar")):
        raise StackError(f"Maven finished but put no Kafka {version} broker jar in {libs}")
    marker.write_text(version)
    return libs


@dataclass(frozen=True)
class KafkaBroker:
    libs: Path
    home: Path  # holds server.properties, data/, logs/, kafka.pid
    broker_port: int
    controller_port: int
    cluster_id: str
    heap: str = "1G"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def pid_file(self) -> Path:
        return self.home / "kafka.pid"

    @property
    def properties_file(self) -> Path:
        return self.home / "server.properties"

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    def pid(self) -> int | None:
        """The running broker's pid; a stale file whose pid now belongs to
        another process (after a crash or reboot) does not count."""
        pid = read_pid(self.pid_file)
        if pid is None or str(self.properties_file) not in command_line(pid):
            return None
        return pid

    def write_properties(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o700)  # the log segments hold personal data
        self.properties_file.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"listeners=PLAINTEXT://127.0.0.1:{self.broker_port},"
                    f"CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.broker_port}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    f"controller.quorum.bootstrap.servers=127.0.0.1:{self.controller_port}",
                    f"log.dirs={self.data_dir}",
                    "auto.create.topics.enable=false",
                    "num.partitions=1",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=10",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "transaction.state.log.num.partitions=10",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "",
                ]
            )
        )

    def _java(self, main: str, *args: str) -> list[str]:
        return [
            "java",
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG_CONFIG}",
            f"-Dkafka.logs.dir={self.log_dir}",
            "-cp",
            f"{self.libs}/*",
            main,
            *args,
        ]

    def format_storage(self) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            self._java(
                STORAGE_TOOL,
                "format",
                "--standalone",
                # "=" form: a generated id may begin with "-", which argparse takes for a flag.
                f"--cluster-id={self.cluster_id}",
                "-c",
                str(self.properties_file),
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(f"Kafka storage format failed:\n{result.stdout}{result.stderr}")

    def start(self, timeout: float = 90.0) -> None:
        if self.pid() is not None:
            return
        self.write_properties()
        self.format_storage()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stdout = (self.log_dir / "stdout.log").open("ab")
        process = subprocess.Popen(
            self._java(MAIN_CLASS, str(self.properties_file)),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        stdout.close()
        self.pid_file.write_text(str(process.pid))
        self._wait_ready(process.pid, timeout)

    def _wait_ready(self, pid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                raise StackError(
                    "Kafka broker exited during start-up; last lines of its log:\n"
                    + tail(self.log_dir / "server.log")
                    + "\n"
                    + tail(self.log_dir / "stdout.log")
                )
            if port_accepts(self.broker_port) and asyncio.run(self._answers_metadata()):
                return
            time.sleep(0.3)
        terminate(pid, 10)
        raise StackError(
            f"Kafka broker did not become ready in {timeout:.0f}s; see {self.log_dir}/server.log"
        )

    async def _answers_metadata(self) -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers, request_timeout_ms=3000)
        try:
            await admin.start()
            await admin.list_topics()
            return True
        except (TimeoutError, KafkaError, OSError):
            return False
        finally:
            await admin.close()

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None:
            terminate(pid, grace_seconds=30)
        self.pid_file.unlink(missing_ok=True)
