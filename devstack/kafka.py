"""KRaft Apache Kafka nodes (combined broker and controller) from Maven Central jars:
one on its own, or three that form one cluster with a three-voter controller quorum."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import ssl
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from devstack.certificates import BrokerTls, ensure_broker_tls
from devstack.processes import (
    StackError,
    command_line,
    kill,
    pid_alive,
    port_accepts,
    read_pid,
    tail,
    terminate,
)
from runtime.kafka_admin import scram_record

HERE = Path(__file__).parent
POM = HERE / "kafka-pom.xml"
TOOLS_POM = HERE / "kafka-tools-pom.xml"
LOG_CONFIG = HERE / "kafka-log4j2.properties"
MAIN_CLASS = "kafka.Kafka"
SUPER_USER = "broker"
SALTED = re.compile(r'saltedpassword="?[^"\],\s]*"?')
STORAGE_TOOL = "kafka.tools.StorageTool"
SINGLE_NODE_SESSION = ("broker.session.timeout.ms=3000", "broker.heartbeat.interval.ms=500")
# Three nodes on one machine: a killed node is noticed (and its partitions led by
# others) after 6 s instead of Kafka's 9, with a heartbeat a second; a node starved of
# CPU for a few seconds is still not fenced by mistake.
CLUSTER_SESSION = ("broker.session.timeout.ms=6000", "broker.heartbeat.interval.ms=1000")


def new_cluster_id() -> str:
    """Kafka's cluster id format: a UUID as unpadded URL-safe base64."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


def ensure_jars(cache_dir: Path, version: str) -> Path:
    """Resolve the broker's jars with Maven once per version; later calls are free."""
    return _resolve_jars(POM, cache_dir, f"kafka-{version}", version, f"kafka_2.13-{version}.jar")


def ensure_tool_jars(cache_dir: Path, version: str) -> Path:
    """Resolve Apache Kafka's command line tools (``org.apache.kafka:kafka-tools``, e.g.
    ``ProducerPerformance``) with Maven once per version, apart from the broker's jars so
    that the broker's classpath stays as it was."""
    return _resolve_jars(
        TOOLS_POM, cache_dir, f"kafka-tools-{version}", version, f"kafka-tools-{version}.jar"
    )


def _resolve_jars(pom: Path, cache_dir: Path, name: str, version: str, expected_jar: str) -> Path:
    # Absolute: Maven resolves a relative output directory against the POM's folder.
    libs = cache_dir.resolve() / name / "libs"
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
            str(pom),
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
            f"Maven could not resolve {pom.name} for Apache Kafka {version}:\n"
            f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    if not (libs / expected_jar).exists():
        raise StackError(f"Maven finished but put no {expected_jar} in {libs}")
    marker.write_text(version)
    return libs


@dataclass(frozen=True)
class ControllerVoter:
    """One member of a multi-node cluster's initial controller quorum. The directory id
    names the node's metadata log directory; every node is formatted with the whole
    list (``--initial-controllers``), so they agree on who votes from the first start."""

    node_id: int
    controller_port: int
    directory_id: str  # a Kafka Uuid, as new_cluster_id() makes

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.controller_port}"

    @property
    def initial_controller(self) -> str:
        return f"{self.node_id}@{self.endpoint}:{self.directory_id}"


@dataclass(frozen=True)
class KafkaBroker:
    """One combined broker and controller, secured:

    - clients and brokers connect over SASL_SSL with SCRAM-SHA-512 (there is no
      plaintext listener); the controller listener takes TLS client certificates only;
    - ``StandardAuthorizer`` with ``allow.everyone.if.no.acl.found=false``: nothing is
      allowed that an ACL does not allow; ``User:broker`` (the broker's SCRAM user
      and its certificate's CN) is the only super user.
    """

    libs: Path
    home: Path  # holds server.properties, tls/, data/, logs/, kafka.pid
    broker_port: int
    controller_port: int
    cluster_id: str
    super_password: str  # User:broker's SCRAM password, created when the storage is formatted
    keystore_password: str
    heap: str = "1G"
    node_id: int = 1
    # Every node of a multi-node cluster (this one included); empty: a single node,
    # formatted as a standalone quorum of one.
    voters: tuple[ControllerVoter, ...] = ()
    tls_dir: Path | None = None  # shared by a cluster's nodes; default: <home>/tls

    @property
    def tls(self) -> BrokerTls:
        return ensure_broker_tls(self.tls_dir or self.home / "tls", self.keystore_password)

    @property
    def replicas(self) -> int:
        """The replication factor this cluster gives its internal topics."""
        return len(self.voters) or 1

    @property
    def min_insync_replicas(self) -> int:
        """With three replicas, a write needs two: one node may be down and nothing
        acknowledged is lost."""
        return 1 if self.replicas == 1 else 2

    @property
    def quorum_bootstrap_servers(self) -> str:
        if not self.voters:
            return f"127.0.0.1:{self.controller_port}"
        return ",".join(voter.endpoint for voter in self.voters)

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
        self.home.chmod(0o700)  # the log segments hold personal data, this file passwords
        tls = self.tls
        scram_login = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{SUPER_USER}" password="{self.super_password}";'
        )
        self.properties_file.touch(mode=0o600, exist_ok=True)
        self.properties_file.chmod(0o600)
        self.properties_file.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    f"node.id={self.node_id}",
                    f"listeners=SASL_SSL://127.0.0.1:{self.broker_port},"
                    f"CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=SASL_SSL://127.0.0.1:{self.broker_port}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=SASL_SSL",
                    "listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:SSL",
                    "sasl.enabled.mechanisms=SCRAM-SHA-512",
                    "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512",
                    f"listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={scram_login}",
                    "listener.name.controller.ssl.client.auth=required",
                    "ssl.keystore.type=PKCS12",
                    f"ssl.keystore.location={tls.keystore}",
                    f"ssl.keystore.password={tls.keystore_password}",
                    f"ssl.key.password={tls.keystore_password}",
                    "ssl.truststore.type=PEM",
                    f"ssl.truststore.location={tls.ca_file}",
                    "ssl.enabled.protocols=TLSv1.3,TLSv1.2",
                    # The controller listener's principal is the certificate's CN.
                    "ssl.principal.mapping.rules=RULE:^CN=([^,]+),.*$/$1/,DEFAULT",
                    "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                    "allow.everyone.if.no.acl.found=false",
                    f"super.users=User:{SUPER_USER}",
                    f"controller.quorum.bootstrap.servers={self.quorum_bootstrap_servers}",
                    f"log.dirs={self.data_dir}",
                    "auto.create.topics.enable=false",
                    "num.partitions=1",
                    f"default.replication.factor={self.replicas}",
                    # Every topic's default, __consumer_offsets included (it has no setting of its own).
                    f"min.insync.replicas={self.min_insync_replicas}",
                    f"offsets.topic.replication.factor={self.replicas}",
                    "offsets.topic.num.partitions=10",
                    f"transaction.state.log.replication.factor={self.replicas}",
                    f"transaction.state.log.min.isr={self.min_insync_replicas}",
                    "transaction.state.log.num.partitions=10",
                    f"share.coordinator.state.topic.replication.factor={self.replicas}",
                    f"share.coordinator.state.topic.min.isr={self.min_insync_replicas}",
                    "group.initial.rebalance.delay.ms=0",
                    # A single node has no one to hand its partitions to: a controlled shutdown
                    # only makes every partition leaderless and unloads the transaction and
                    # group coordinators while producers are still committing, and the broker
                    # then stops anyway. In the fault tests a transaction straddling that window
                    # has twice ended with a partition's records closed by the wrong marker (a
                    # committed event read as aborted; a routed batch read twice). No Kafka bug
                    # report matches: this avoids the window, it does not explain it. Without
                    # it a SIGTERM still flushes and closes every log cleanly.
                    f"controlled.shutdown.enable={'true' if self.voters else 'false'}",
                    # Without a controlled shutdown the node's registration outlives it: started
                    # again, it is refused (DUPLICATE_BROKER_REGISTRATION) until its last session
                    # expires, 9 s by default. A single node heartbeats its own controller, so a
                    # 3 s session (a heartbeat every 0.5 s) fences nothing by mistake and makes a
                    # restart ready about 6 s sooner.
                    *(CLUSTER_SESSION if self.voters else SINGLE_NODE_SESSION),
                    "",
                ]
            )
        )

    @property
    def class_archive(self) -> Path:
        """The JVM's archive of the classes a broker loads (class-data sharing), one per
        Kafka version beside its jars: a broker mapping it starts about 2 s sooner."""
        return self.libs.parent / "classes.jsa"

    @property
    def _archive_in_progress(self) -> Path:
        return self.home / "classes.jsa.part"

    def _java(self, main: str, *args: str) -> list[str]:
        return [*self._java_options(dump_classes=main == MAIN_CLASS), main, *args]

    def _java_options(self, dump_classes: bool = False) -> list[str]:
        if self.class_archive.exists():
            # A stale archive (another JDK, changed jars) is refused by the JVM, which then
            # loads every class as usual.
            sharing = [f"-XX:SharedArchiveFile={self.class_archive}"]
        elif dump_classes:
            # No archive yet: this broker writes one as it exits; stop() keeps it only if
            # the broker exited by itself (a SIGKILL could cut it short).
            sharing = [f"-XX:ArchiveClassesAtExit={self._archive_in_progress}"]
        else:
            sharing = []
        return [
            "java",
            *sharing,
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG_CONFIG}",
            f"-Dkafka.logs.dir={self.log_dir}",
            "-cp",
            f"{self.libs}/*",
        ]

    def prepare_storage(self) -> None:
        """Write the configuration and format the storage (once)."""
        self.write_properties()
        self.format_storage()

    def format_storage(self) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.voters:
            quorum = "--initial-controllers=" + ",".join(voter.initial_controller for voter in self.voters)
        else:
            quorum = "--standalone"
        arguments = [
            STORAGE_TOOL,
            "format",
            quorum,
            # "=" form: a generated id may begin with "-", which argparse takes for a flag.
            f"--cluster-id={self.cluster_id}",
            # The transaction protocol aiokafka speaks (EndTxn below v5): without KIP-890
            # part 2 (level 2, finalized by default since 4.0) the coordinator's own aborts
            # and markers follow the same rules as the clients' transactions.
            "--feature",
            "transaction.version=1",
            # The broker's own SCRAM credential must exist before it can talk to itself.
            # The salted form lets one log in as well as the password does, so it goes
            # through a 0600 argument file, not the command line (which others can read).
            "--add-scram",
            scram_record(SUPER_USER, self.super_password),
            "-c",
            str(self.properties_file),
        ]
        argfile = self.home / "format.args"
        descriptor = os.open(argfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as stream:
            # Java argument files: one argument a line, in single quotes (the record holds
            # double quotes); none of ours holds a single quote or a backslash.
            stream.write("\n".join(f"'{argument}'" for argument in arguments) + "\n")
        try:
            result = subprocess.run(
                [*self._java_options(), f"@{argfile}"], capture_output=True, text=True, check=False
            )
        finally:
            argfile.unlink()
        if result.returncode != 0:
            output = SALTED.sub("saltedpassword=***", result.stdout + result.stderr)
            raise StackError(f"Kafka storage format failed:\n{output}")

    def client_options(self) -> dict[str, object]:
        """Connection options for the super user (the stack's own bootstrap only)."""
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": "SASL_SSL",
            "ssl_context": ssl.create_default_context(cafile=str(self.tls.ca_file)),
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": SUPER_USER,
            "sasl_plain_password": self.super_password,
        }

    def start(self, timeout: float = 90.0) -> None:
        if self.pid() is not None:
            return
        self.wait_ready(self.launch(), timeout)

    def launch(self) -> int:
        """Start the node's process without waiting for it: a node of a cluster cannot be
        ready before a majority of the controllers runs. Returns its pid."""
        running = self.pid()
        if running is not None:
            return running
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
        return process.pid

    def wait_ready(self, pid: int, timeout: float = 90.0) -> None:
        """Until the node answers a metadata request on its client listener."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                raise StackError(
                    f"Kafka broker {self.node_id} exited during start-up; last lines of its log:\n"
                    + tail(self.log_dir / "server.log")
                    + "\n"
                    + tail(self.log_dir / "stdout.log")
                )
            if port_accepts(self.broker_port) and asyncio.run(self._answers_metadata()):
                return
            time.sleep(0.3)
        terminate(pid, 10)
        raise StackError(
            f"Kafka broker {self.node_id} did not become ready in {timeout:.0f}s; "
            f"see {self.log_dir}/server.log"
        )

    async def _answers_metadata(self) -> bool:
        admin = AIOKafkaAdminClient(**self.client_options(), request_timeout_ms=3000)
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
        exited = pid is not None and terminate(pid, grace_seconds=30)
        self.pid_file.unlink(missing_ok=True)
        if exited and self._archive_in_progress.exists():
            # Atomic: a broker starting meanwhile maps either no archive or a whole one.
            os.replace(self._archive_in_progress, self.class_archive)
        self._archive_in_progress.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL the node, as a crash or a pulled plug would stop it: no controlled
        shutdown, no flush; its data stays for a restart."""
        pid = self.pid()
        if pid is not None:
            kill(pid)
        self.pid_file.unlink(missing_ok=True)
        self._archive_in_progress.unlink(missing_ok=True)
