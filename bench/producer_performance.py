"""The physical limit: Apache Kafka's own ``ProducerPerformance`` tool against the
bench stack's broker (SASL_SSL, SCRAM-SHA-512, acks=all), with a given record size.

No Python client can move records faster than the broker's own Java producer on the
same machine, so this is the figure the router and its bare pipe are bounded by:
"this broker on this machine". The tool's jars (``org.apache.kafka:kafka-tools``, the
broker's version) are resolved from Maven Central once and cached, like the broker's.

Like every benchmark here it proves its work: after the run it reads the topic's end
offsets and fails, printing no rate, unless exactly the records the tool reports as
sent are on the topic.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import NewTopic
from aiokafka.structs import TopicPartition

from bench.arrivals import TooSlow, require_all_arrived
from bench.scratch import BENCH_USER
from devstack.kafka import ensure_tool_jars
from runtime.access import Principal
from runtime.kafka import admin, connection_options
from runtime.settings import Settings

MAIN_CLASS = "org.apache.kafka.tools.ProducerPerformance"

# The tool's last line, e.g. "60000 records sent, 31914.9 records/sec (47.87 MB/sec),
# 412.50 ms avg latency, 913.00 ms max latency, 404 ms 50th, 835 ms 95th, 892 ms 99th,
# 910 ms 99.9th."
SUMMARY = re.compile(
    r"(?P<records>\d+) records sent, (?P<per_s>[\d.]+) records/sec \((?P<mb_per_s>[\d.]+) MB/sec\),"
    r" (?P<avg_ms>[\d.]+) ms avg latency, (?P<max_ms>[\d.]+) ms max latency,"
    r" (?P<p50_ms>\d+) ms 50th, (?P<p95_ms>\d+) ms 95th, (?P<p99_ms>\d+) ms 99th,"
    r" (?P<p999_ms>\d+) ms 99\.9th"
)


class ProducerPerformanceFailed(RuntimeError):
    pass


def parse_summary(output: str) -> dict[str, float]:
    """The figures of the tool's final summary line (the per-5-seconds lines before it
    have no percentiles, so they do not match)."""
    found = list(SUMMARY.finditer(output))
    if not found:
        raise ProducerPerformanceFailed(f"no summary line in ProducerPerformance's output:\n{output[-1500:]}")
    figures = found[-1].groupdict()
    return {name: int(value) if name == "records" else float(value) for name, value in figures.items()}


def client_properties(settings: Settings, user: str = BENCH_USER) -> str:
    """A Java client configuration for ``user`` on the stack's SASL_SSL listener, trusting
    the stack's CA only (PEM trust store). Holds the user's password: written to a
    private temporary file and removed after the run."""
    options = connection_options(settings, user)
    if settings.kafka_security_protocol != "SASL_SSL" or settings.kafka_ssl_cafile is None:
        raise ProducerPerformanceFailed("the benchmark stack must use SASL_SSL with its own CA file")
    username, password = options["sasl_plain_username"], options["sasl_plain_password"]
    jaas = (
        "org.apache.kafka.common.security.scram.ScramLoginModule required"
        f' username="{username}" password="{password}";'
    )
    return "\n".join(
        [
            f"bootstrap.servers={options['bootstrap_servers']}",
            "security.protocol=SASL_SSL",
            f"sasl.mechanism={options['sasl_mechanism']}",
            f"sasl.jaas.config={jaas}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={settings.kafka_ssl_cafile}",
            "",
        ]
    )


async def _end_offsets(settings: Settings, topic: str, partitions: int) -> int:
    consumer = AIOKafkaConsumer(**connection_options(settings, BENCH_USER), enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
        return sum(ends.values())
    finally:
        await consumer.stop()


async def measure(
    settings: Settings,
    *,
    records: int,
    record_size: int,
    partitions: int = 1,
    batch_size: int = 1024 * 1024,
    linger_ms: int = 10,
    seconds: float = 300,
) -> dict[str, Any]:
    """Run ProducerPerformance once on a fresh topic; its figures, once the records are
    proved to be on the topic."""
    if shutil.which("java") is None:
        raise ProducerPerformanceFailed("java is not installed; run scripts/setup.sh first")
    libs = await asyncio.to_thread(ensure_tool_jars, settings.cache_dir, settings.kafka_version)
    topic = f"{settings.topic_prefix}.bare.producer-performance"
    client = admin(settings, principal=Principal.OPERATOR)
    await client.start()
    try:
        await client.create_topics([NewTopic(topic, partitions, settings.topic_replication_factor)])
    finally:
        await client.close()
    with tempfile.TemporaryDirectory(prefix="tuo-perf-") as scratch:
        config = Path(scratch) / "client.properties"
        config.touch(mode=0o600)
        config.write_text(client_properties(settings))
        command = [
            "java",
            "-Xmx512m",
            "-cp",
            f"{libs}/*",
            MAIN_CLASS,
            "--topic",
            topic,
            "--num-records",
            str(records),
            "--record-size",
            str(record_size),
            "--throughput",
            "-1",
            "--producer.config",
            str(config),
            "--producer-props",
            "acks=all",
            f"batch.size={batch_size}",
            f"linger.ms={linger_ms}",
            f"max.request.size={max(batch_size, 1024 * 1024)}",
        ]
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), seconds)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise TooSlow("Kafka's ProducerPerformance", seconds, f"{records:,} records asked for") from None
        took = time.perf_counter() - started
    text = output.decode(errors="replace")
    if process.returncode != 0:
        raise ProducerPerformanceFailed(f"ProducerPerformance exited {process.returncode}:\n{text[-1500:]}")
    figures = parse_summary(text)
    on_topic = await _end_offsets(settings, topic, partitions)
    require_all_arrived(
        "Kafka's ProducerPerformance (records on the topic)", int(figures["records"]), on_topic
    )
    require_all_arrived("Kafka's ProducerPerformance (records asked for)", records, int(figures["records"]))
    return {
        "what": "this broker on this machine: Kafka's own Java producer, acks=all, SASL_SSL",
        "sent": records,
        "arrived": on_topic,
        "record_size": record_size,
        "partitions": partitions,
        "batch_size": batch_size,
        "linger_ms": linger_ms,
        "records_per_s": figures["per_s"],
        "mb_per_s": figures["mb_per_s"],
        "latency_avg_ms": figures["avg_ms"],
        "latency_p50_ms": figures["p50_ms"],
        "latency_p95_ms": figures["p95_ms"],
        "latency_p99_ms": figures["p99_ms"],
        "latency_max_ms": figures["max_ms"],
        "took_s": round(took, 1),
    }
