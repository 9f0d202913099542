"""What arrived at the far end of a benchmark, counted before any rate is printed.

A benchmark that prints a rate for work it did not do is worse than none. So each
benchmark reads back what it produced (Kafka topics with ``read_committed``, counted
by ``ce_id``; rows in PostgreSQL), compares it with what it sent, and raises
``NotAllArrived``, naming both counts, if they differ. Its rate is printed only after.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord, TopicPartition

from bench.proof import WorkNotDone, prove
from bench.scratch import bench_client_options
from runtime.settings import Settings

# One failure for "what arrived is not what was sent", whichever benchmark counts it:
# ``python -m bench`` records its counts (see bench.proof).
NotAllArrived = WorkNotDone


def require_all_arrived(what: str, sent: int, arrived: int, detail: str = "") -> None:
    prove(what, sent, arrived, detail)


class TooSlow(RuntimeError):
    """A benchmark step passed its time limit: it fails instead of hanging."""

    def __init__(self, what: str, seconds: float, progress: str) -> None:
        super().__init__(f"{what} did not finish within {seconds:.0f} s ({progress})")


@dataclass
class TopicTally:
    """One topic's committed messages: how often each ``ce_id`` appears, the bytes each
    record puts on the wire (key, value, header names and values), and its first record."""

    ids: Counter[str] = field(default_factory=Counter)
    messages: int = 0
    record_bytes: int = 0
    first: ConsumerRecord[bytes, bytes] | None = None
    samples: dict[str, ConsumerRecord[bytes, bytes]] = field(default_factory=dict)


def record_bytes(record: ConsumerRecord[bytes, bytes]) -> int:
    return (
        len(record.key or b"")
        + len(record.value or b"")
        + sum(len(name) + len(value or b"") for name, value in record.headers)
    )


def ce_id(record: ConsumerRecord[bytes, bytes]) -> str | None:
    return next((v.decode(errors="replace") for k, v in record.headers if k == "ce_id"), None)


async def read_committed(
    settings: Settings,
    topics: Iterable[str],
    *,
    seconds: float = 300,
    sample_by: str | None = None,
) -> dict[str, TopicTally]:
    """Read every committed message now on ``topics`` (as ``BENCH_USER``, from the start
    up to each partition's last stable offset) and tally them by ``ce_id``. With
    ``sample_by`` a separator, keep one record per ``ce_id`` suffix after it (e.g. one
    routing decision per agency: ``<event id>/<agency>``)."""
    names = list(topics)
    consumer = AIOKafkaConsumer(
        **bench_client_options(settings),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=32 * 1024 * 1024,
    )
    await consumer.start()
    tallies = {name: TopicTally() for name in names}
    try:
        found = await _partitions(settings, names)
        partitions = [TopicPartition(name, p) for name in names for p in found[name]]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)  # read_committed: the last stable offsets
        deadline = time.monotonic() + seconds
        while any([await consumer.position(tp) < ends[tp] for tp in partitions]):
            if time.monotonic() > deadline:
                read = sum(t.messages for t in tallies.values())
                raise TooSlow("reading back the benchmark's messages", seconds, f"{read:,} read")
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for tp, records in batches.items():
                tally = tallies[tp.topic]
                for record in records:
                    if record.offset >= ends[tp]:
                        continue  # written after we looked: not this run's work
                    identity = ce_id(record) or ""
                    tally.ids[identity] += 1
                    tally.messages += 1
                    tally.record_bytes += record_bytes(record)
                    if tally.first is None:
                        tally.first = record
                    if sample_by is not None and sample_by in identity:
                        tally.samples.setdefault(identity.rsplit(sample_by, 1)[1], record)
    finally:
        await consumer.stop()
    return tallies


async def _partitions(settings: Settings, topics: list[str]) -> dict[str, list[int]]:
    client = AIOKafkaAdminClient(**bench_client_options(settings))
    await client.start()
    try:
        described = await client.describe_topics(topics)
    finally:
        await client.close()
    found = {
        d["topic"]: sorted(p["partition"] for p in d["partitions"]) for d in described if not d["error_code"]
    }
    missing = [t for t in topics if not found.get(t)]
    if missing:
        raise RuntimeError(f"no such topic: {', '.join(missing)}")
    return found
