"""The router service: consume life events, have each batch planned (``router.plan``:
read, verify, decide), and in one Kafka transaction produce the agency messages, the
routing decisions and the consumer offsets.

Downstream readers use read_committed, so a crash at any point neither loses
nor duplicates a delivery. There is one transactional id per input partition
(see ``Router``), the pre-KIP-447 way to keep exactly-once across rebalances
with aiokafka: several routers may share the consumer group.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.structs import ConsumerRecord, TopicPartition

from router.consent_changes import notices
from router.messages import Outgoing
from router.plan import COMPONENT, BatchPlan, OriginalNotYetDecided, plan_batch
from router.rules import Outcome, RoutingDecision
from router.store import agencies
from runtime import kafka
from runtime.access import Principal
from runtime.garbage import fewer_collections
from runtime.kafka import Topics, ensure_topics
from runtime.keyring import KeyRing
from runtime.metrics import DEAD_LETTERS, DELIVERIES, EVENTS_ROUTED, LAG, WITHHELD
from runtime.offsets import UnstableOffsets, stable_committed
from runtime.settings import Settings

log = structlog.get_logger(__name__)
T = TypeVar("T")
ORIGINAL_WAIT_SECONDS = 60.0  # then a correction whose original is unknown is dead-lettered
# A batch normally commits in well under a second. One that has not committed in this long
# (a transaction or a fence stuck across a broker restart: aiokafka waits for ever where
# Java's client stops at max.block.ms) fails the router, which its supervisor restarts:
# the new producers fence the stuck transaction and the batch is routed again.
STUCK_SECONDS = 60.0
MAX_BATCH = 2000  # records per poll, across partitions: one transaction per partition per poll


@dataclass
class RoutingTally:
    """What one batch decided, for the metrics: counted only once its transaction has
    committed (``count``), so an aborted batch, routed again later, counts once."""

    routed: Counter[str] = field(default_factory=Counter)  # by event type
    delivered: Counter[str] = field(default_factory=Counter)  # by agency
    withheld: Counter[tuple[str, str]] = field(default_factory=Counter)  # by (agency, reason)
    dead_letters: int = 0

    def decided(self, event_type: str, decisions: Iterable[RoutingDecision], redelivery: bool) -> None:
        if not redelivery:  # a redelivery is a further copy of an event routed before
            self.routed[event_type] += 1
        for decision in decisions:
            if decision.delivers:
                self.delivered[decision.agency] += 1
            elif not redelivery:
                self.withheld[(decision.agency, _REASONS[decision.outcome])] += 1

    def planned(self, plan: BatchPlan) -> None:
        for decided in plan.decided:
            self.decided(decided.event_type, decided.decisions, decided.redelivery)
        self.dead_letters += plan.dead_letters

    def count(self) -> None:
        for event_type, n in self.routed.items():
            EVENTS_ROUTED.labels(event_type=event_type).inc(n)
        for agency, n in self.delivered.items():
            DELIVERIES.labels(agency=agency).inc(n)
        for (agency, reason), n in self.withheld.items():
            WITHHELD.labels(agency=agency, reason=reason).inc(n)
        if self.dead_letters:
            DEAD_LETTERS.labels(component=COMPONENT).inc(self.dead_letters)


_REASONS = {
    Outcome.WITHHELD_NO_CONSENT: "no_consent",
    Outcome.WITHHELD_NO_SUBSCRIPTION: "no_subscription",
    Outcome.WITHHELD_AREA_UNKNOWN: "area_unknown",
    Outcome.WITHHELD_NOT_OF_INTEREST: "not_of_interest",
    Outcome.BLOCKED: "blocked",
}


class Router:
    """One router instance. Any number may run in one consumer group: each input
    partition has its own transactional producer (``<prefix>.router.<topic>.<n>``),
    created when the partition is assigned. Creating it fences the partition's
    previous owner — a crashed or paused instance can no longer commit — and only
    then are the committed offsets read, so no batch is delivered twice."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.pool = pool
        self.topics = Topics(settings.topic_prefix)
        self.group_id = f"{settings.topic_prefix}.router"
        self.producers: dict[TopicPartition, AIOKafkaProducer] = {}
        # The next input offset each partition must route. Only records at or past it
        # are routed, whatever position the consumer's own offset machinery restores.
        self.next_offset: dict[TopicPartition, int] = {}
        self.partition_counts: dict[str, int] = {}
        self.assignment_failed: Exception | None = None
        self.waiting_since: dict[tuple[TopicPartition, int], float] = {}
        self.keys = KeyRing.from_database(pool)  # the offices' public keys, to verify every event
        self.consent_keys = KeyRing.consent_from_database(pool)  # to verify every consent change
        self.lock = asyncio.Lock()  # a rebalance waits for the batch in hand
        self.assignments = 0  # bumps on every assignment: batches fetched before it are stale
        self.retry_soon = False  # a correction waits for its original: poll again in a while
        self.consumer = kafka.consumer(
            settings,
            principal=Principal.ROUTER,
            group_id=self.group_id,
            client_id="tuo-router",
            role="router",
            session_timeout_ms=6000,  # the broker's minimum: a crashed router is replaced fast
            heartbeat_interval_ms=2000,
        )

    def _overdue(self, tp: TopicPartition) -> frozenset[int]:
        """Offsets of corrections that have waited too long for their original."""
        now = time.monotonic()
        return frozenset(
            offset
            for (partition, offset), since in self.waiting_since.items()
            if partition == tp and now - since > ORIGINAL_WAIT_SECONDS
        )

    async def _partition_count(self, producer: AIOKafkaProducer, topic: str) -> int:
        # Cached for the instance's life: partitions added later are used after a restart.
        # Same formula as aiokafka's default partitioner, so keys land where they always did.
        if topic not in self.partition_counts:
            self.partition_counts[topic] = len(await producer.partitions_for(topic))
        return self.partition_counts[topic]

    def transactional_id(self, tp: TopicPartition) -> str:
        return f"{self.settings.topic_prefix}.router.{tp.topic}.{tp.partition}"

    async def partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self.lock:
            for tp in revoked:
                self.next_offset.pop(tp, None)
            # All at once: the group waits for this callback, and a slow one gets the
            # member dropped (session timeout), which starts another rebalance.
            await asyncio.gather(*(p.stop() for tp in revoked if (p := self.producers.pop(tp, None))))
            log.info("router_partitions_revoked", partitions=sorted(tp.partition for tp in revoked))

    async def partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        try:
            await _within(STUCK_SECONDS, self._take_over(assigned), "taking over partitions")
        except Exception as exc:  # noqa: BLE001 - aiokafka would only log it; make the router restart
            self.assignment_failed = exc

    async def _take_over(self, assigned: set[TopicPartition]) -> None:
        async with self.lock:
            self.assignments += 1
            started = time.monotonic()
            new = {
                tp: kafka.producer(
                    self.settings,
                    principal=Principal.ROUTER,
                    client_id="tuo-router",
                    role="router",
                    transactional_id=self.transactional_id(tp),
                )
                for tp in assigned - set(self.producers)
            }
            self.producers.update(new)  # stopped with the rest, even if one fails to start
            # InitProducerId fences and settles each partition's old owner; all at once,
            # as a slow callback gets this member dropped from the group.
            await asyncio.gather(*(producer.start() for producer in new.values()))
            fenced = time.monotonic()
            # Read after the fence, and only once stable: the old owner's last transaction
            # has settled and its offset commit is applied, so this includes its offsets
            # (an offset fetched earlier, or read as that commit is applied, could predate them).
            try:
                committed = await stable_committed(self.consumer, self.group_id, assigned)
            except UnstableOffsets as exc:
                # The broker has not settled a transaction in that long: go on with the offsets
                # committed so far rather than stop routing; a delivery may then repeat, which
                # the agencies' inboxes answer as a duplicate.
                log.warning("router_offsets_not_stable", detail=str(exc))
                committed = {tp: await self.consumer.committed(tp) for tp in assigned}
            unread = [tp for tp in assigned if committed[tp] is None]
            beginning = await self.consumer.beginning_offsets(unread) if unread else {}
            for tp in assigned:
                offset = committed[tp] if committed[tp] is not None else beginning[tp]
                assert offset is not None
                self.next_offset[tp] = offset
                self.consumer.seek(tp, offset)
            log.info(
                "router_partitions_assigned",
                partitions=sorted(tp.partition for tp in assigned),
                fence_seconds=round(fenced - started, 2),
                offsets_seconds=round(time.monotonic() - fenced, 2),
            )

    async def run(self, stop: asyncio.Event) -> None:
        self.consumer.subscribe(
            [self.topics.life_events, self.topics.redeliveries, self.topics.consent_changes],
            listener=_Rebalance(self),
        )
        LAG.watch(self.group_id, self.consumer)
        try:
            # Agencies subscribed since the bus started need their topics before we send to them.
            subscribed = await agencies(self.pool)
            await ensure_topics(
                self.settings, subscribed, principal=Principal.ROUTER, bus=False, receipts=False
            )
            await self.consumer.start()
            log.info("router_started", group_id=self.group_id)
            with fewer_collections():  # a batch is thousands of short-lived objects
                while not stop.is_set():
                    epoch = self.assignments
                    batches = await self.consumer.getmany(timeout_ms=500, max_records=MAX_BATCH)
                    if self.assignment_failed is not None:
                        raise self.assignment_failed
                    if not batches:
                        continue
                    async with self.lock:
                        if epoch != self.assignments:
                            # Fetched across a rebalance: drop it and rewind, since getmany has
                            # already moved the position past these records.
                            for tp in batches:
                                if tp in self.next_offset:
                                    self.consumer.seek(tp, self.next_offset[tp])
                            continue
                        planned = await _within(STUCK_SECONDS, self._plan_all(batches), "routing a batch")
                        await _within(
                            STUCK_SECONDS,
                            asyncio.gather(*(self._commit(p) for p in planned)),
                            "committing a batch",
                        )
                    if self.retry_soon:  # a correction waits for its original's decisions
                        self.retry_soon = False
                        await asyncio.sleep(0.5)
        finally:
            LAG.forget(self.consumer)
            for client in (self.consumer, *self.producers.values()):
                try:
                    await _within(STUCK_SECONDS, client.stop(), "stopping a Kafka client")
                except RouterStuck:
                    log.warning("router_client_not_stopped", client=type(client).__name__)
            self.producers.clear()

    async def _plan_all(
        self, batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
    ) -> list[Planned]:
        # Each partition's plan reads the database on its own connection, so their round
        # trips overlap; each has its own clock, consent and transaction. If one fails,
        # the others are stopped before the failure goes on (none is left running).
        plans = [asyncio.ensure_future(self._plan(tp, records)) for tp, records in batches.items()]
        try:
            await asyncio.gather(*plans)
        except BaseException:
            for plan in plans:
                plan.cancel()
            await asyncio.gather(*plans, return_exceptions=True)
            raise
        return [p for plan in plans for p in plan.result()]

    async def _plan(self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]) -> list[Planned]:
        """What one partition's batch produces; nothing if the partition is no longer ours."""
        if self.producers.get(tp) is None or tp not in self.next_offset:
            return []  # no longer ours; the new owner reads from the committed offset
        records = [r for r in records if r.offset >= self.next_offset[tp]]  # never route twice
        if not records:
            return []
        tally = RoutingTally()
        try:
            if tp.topic == self.topics.consent_changes:
                outgoing, tally.dead_letters = await notices(
                    self.pool, self.topics, records, keys=self.consent_keys
                )
            else:
                plan = await plan_batch(
                    self.pool,
                    self.topics,
                    records,
                    self.settings.schema_base_url(),
                    self._overdue(tp),
                    keys=self.keys,
                )
                outgoing = plan.outgoing
                tally.planned(plan)
        except OriginalNotYetDecided as waiting:
            # Its original's decisions are not recorded yet (the tracker lags, or the
            # original is earlier in this very batch): route what comes before it,
            # then rewind to it and try again shortly.
            self.waiting_since.setdefault((tp, waiting.offset), time.monotonic())
            before = [r for r in records if r.offset < waiting.offset]
            planned = await self._plan(tp, before) if before else []
            self.consumer.seek(tp, waiting.offset)
            self.retry_soon = True
            return planned
        return [Planned(tp, records[-1].offset + 1, outgoing, tally)]

    async def _commit(self, planned: Planned) -> None:
        """A partition's planned batch and its input offsets, in one Kafka transaction."""
        tp, producer = planned.tp, self.producers[planned.tp]
        by_topic: dict[str, list[kafka.Message]] = {}  # in order within each topic
        for message in planned.outgoing:
            by_topic.setdefault(message.topic, []).append((message.key, message.value, message.headers))
        sent: list[asyncio.Future[Any]] = []
        try:
            async with producer.transaction():
                for topic, messages in by_topic.items():
                    count = await self._partition_count(producer, topic)
                    sent += await kafka.send_many(producer, topic, messages, partitions=count)
                await kafka.offsets_after_writes(producer, sent, {tp: planned.next_offset}, self.group_id)
        finally:
            # The commit (or the abort) has settled every send; a failed one is reported by
            # the transaction itself, so only mark its error as seen (no "never retrieved").
            for future in sent:
                if future.done() and not future.cancelled():
                    future.exception()
        planned.tally.count()  # committed
        self.next_offset[tp] = planned.next_offset
        for key in [k for k in self.waiting_since if k[0] == tp and k[1] < self.next_offset[tp]]:
            del self.waiting_since[key]


@dataclass
class Planned:
    """One partition's batch, decided, waiting for its transaction."""

    tp: TopicPartition
    next_offset: int  # the input offset its transaction commits
    outgoing: list[Outgoing]
    tally: RoutingTally


class RouterStuck(RuntimeError):
    """A step that should take a moment has taken ``STUCK_SECONDS``."""


async def _within(seconds: float, step: Awaitable[T], what: str) -> T:
    try:
        return await asyncio.wait_for(step, timeout=seconds)
    except TimeoutError:
        raise RouterStuck(f"router stuck {what} for {seconds:.0f}s; restarting it") from None


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, router: Router) -> None:
        self.router = router

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.router.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.router.partitions_assigned(assigned)


async def run_router(settings: Settings, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
    await Router(settings, pool).run(stop)
