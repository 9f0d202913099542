"""Consumer-group lag: how far each reader of the bus is behind what has been written.

For each agency's group (``<prefix>.agency.<agency>`` on its own topic), the
router's (``<prefix>.router`` on life events, redeliveries and consent changes) and the receipt
tracker's (``<prefix>.receipt-tracker`` on routing decisions and receipts), the
offsets the group has committed against the topics' end, as the operators' Kafka
user (which may describe groups and topics, and reads none).

The end is the *last stable offset* (a read_committed consumer's ``end_offsets``):
a transaction still open is not lag yet. Lag counts offsets, not events. On a
topic written in Kafka transactions (life events, redeliveries and consent changes by the relay,
agencies' topics and routing decisions by the router) every transaction ends with
a commit marker that takes an offset of its own, and a group that has read
everything has committed the offset *of* the last marker, one short of the end:
so there a lag of 1 is caught up, and any real backlog shows at least 2. A group
that has never committed shows as not started, its backlog the whole partition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CoordinatorLoadInProgressError, GroupCoordinatorNotAvailableError
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from router.store import agencies as subscribed_agencies
from runtime import kafka
from runtime.access import Principal
from runtime.kafka import Topics
from runtime.settings import Settings

ROUTER, TRACKER = "router", "receipt tracker"


@dataclass(frozen=True)
class Reader:
    """A consumer group of the bus and the topics it reads."""

    name: str  # "router", "receipt tracker", or the agency
    group: str
    topics: tuple[str, ...]
    transactional: frozenset[str]  # those written in Kafka transactions
    agency: bool = False


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None  # None: the group has never committed here
    end: int  # the last stable offset
    start: int

    @property
    def lag(self) -> int:
        return max(0, self.end - (self.start if self.committed is None else self.committed))


@dataclass(frozen=True)
class GroupLag:
    reader: Reader
    partitions: list[PartitionLag]

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def pending(self) -> int:
        """The lag without the last commit marker of each caught-up transactional partition."""
        return sum(p.lag - self._marker_only(p) for p in self.partitions)

    def _marker_only(self, p: PartitionLag) -> int:
        return int(p.lag == 1 and p.committed is not None and p.topic in self.reader.transactional)

    @property
    def started(self) -> bool:
        return any(p.committed is not None for p in self.partitions)

    @property
    def caught_up(self) -> bool:
        """Nothing left to read: a lag of 1 on a transactional topic is its last marker."""
        return all(p.lag == self._marker_only(p) for p in self.partitions)

    @property
    def state(self) -> str:
        if not self.partitions:
            return "no topic"
        if not self.started:
            return "not started" if self.lag else "not started, nothing to read"
        return "caught up" if self.caught_up else "behind"


def readers(prefix: str, agencies: Iterable[str], receipts: Iterable[str] | None = None) -> list[Reader]:
    """The router and the receipt tracker (unless ``receipts``, the receipt topics, is
    None), then each agency."""
    topics = Topics(prefix)
    found = []
    if receipts is not None:
        transactional = frozenset({topics.life_events, topics.redeliveries, topics.consent_changes})
        found.append(Reader(ROUTER, f"{prefix}.router", tuple(sorted(transactional)), transactional))
        found.append(
            Reader(
                TRACKER,
                f"{prefix}.receipt-tracker",
                (topics.routing_decisions, *sorted(receipts)),
                frozenset({topics.routing_decisions}),
            )
        )
    for agency in agencies:
        own = topics.agency(agency)
        found.append(Reader(agency, f"{prefix}.agency.{agency}", (own,), frozenset({own}), agency=True))
    return found


async def consumer_lag(
    settings: Settings, pool: asyncpg.Pool, *, agency: str | None = None
) -> list[GroupLag]:
    """Lag of the router, the receipt tracker and every subscribed agency (or only
    ``agency``'s group), measured now."""
    prefix = settings.topic_prefix
    topics = Topics(prefix)
    known = await subscribed_agencies(pool)
    if agency is not None and agency not in known:
        raise UnknownAgency(agency)
    consumer = kafka.consumer(settings, principal=Principal.OPERATOR, group_id=None, client_id="tuo-lag")
    admin = kafka.admin(settings, principal=Principal.OPERATOR)
    await consumer.start()
    try:
        await admin.start()
        described = await admin.describe_topics()  # every topic the operators' user may describe
        existing = {
            t["topic"]: sorted(p["partition"] for p in t["partitions"])
            for t in described
            if t["error_code"] == 0
        }
        receipts = [t for t in existing if t.startswith(topics.receipts(""))]
        wanted = readers(prefix, [agency] if agency else known, None if agency else receipts)
        partitions = {
            r.group: [TopicPartition(t, p) for t in r.topics if t in existing for p in existing[t]]
            for r in wanted
        }
        every = [tp for tps in partitions.values() for tp in tps]
        starts = await consumer.beginning_offsets(every) if every else {}
        ends = await consumer.end_offsets(every) if every else {}  # read_committed: the LSO
        measured = []
        for reader in wanted:
            tps = partitions[reader.group]
            committed = await _committed(admin, reader.group, tps) if tps else {}
            measured.append(
                GroupLag(
                    reader,
                    [
                        PartitionLag(
                            tp.topic,
                            tp.partition,
                            committed[tp].offset if tp in committed and committed[tp].offset >= 0 else None,
                            ends[tp],
                            starts[tp],
                        )
                        for tp in tps
                    ],
                )
            )
        return measured
    finally:
        await consumer.stop()
        await admin.close()


COORDINATOR_WAIT_SECONDS = 15.0


async def _committed(
    admin: AIOKafkaAdminClient, group: str, partitions: list[TopicPartition]
) -> dict[TopicPartition, OffsetAndMetadata]:
    """The group's committed offsets. A cluster where no group has committed yet creates
    its offsets topic on first use, and says "coordinator not available" meanwhile."""
    deadline = asyncio.get_running_loop().time() + COORDINATOR_WAIT_SECONDS
    while True:
        try:
            found: dict[TopicPartition, OffsetAndMetadata] = await admin.list_consumer_group_offsets(
                group, partitions=partitions
            )
            return found
        except (GroupCoordinatorNotAvailableError, CoordinatorLoadInProgressError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


class UnknownAgency(LookupError):
    def __init__(self, agency: str) -> None:
        super().__init__(f"no agency {agency!r} has a subscription; see `tuo subscriptions list`")
