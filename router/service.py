"""The router service: consume life events, decide, and in one Kafka transaction
produce the agency messages, the routing decisions and the consumer offsets.

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
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TypeVar

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.partitioner import murmur2
from aiokafka.structs import ConsumerRecord, TopicPartition

from router import messages
from router.consent_changes import notices
from router.messages import (
    Incoming,
    Outgoing,
    UnroutableEvent,
    agency_copy,
    verify_signature,
)
from router.policy import POLICY
from router.rules import (
    ConsentState,
    Outcome,
    RoutingDecision,
    Subscription,
    decide,
    decide_follow_up,
)
from router.store import OriginalEvent, agencies, current_consent, load_subscriptions, original_deliveries
from runtime import kafka
from runtime.access import Principal
from runtime.dead_letters import dead_letter
from runtime.kafka import Topics, ensure_topics
from runtime.keyring import KeyRing
from runtime.metrics import DEAD_LETTERS, DELIVERIES, EVENTS_ROUTED, LAG, WITHHELD
from runtime.settings import Settings
from schemas import encode, models
from schemas.cloudevents import REDELIVER_TO, REDELIVERY_ID, headers_for

log = structlog.get_logger(__name__)
COMPONENT = "router"
T = TypeVar("T")
ORIGINAL_WAIT_SECONDS = 60.0  # then a correction whose original is unknown is dead-lettered
# A batch normally commits in well under a second. One that has not committed in this long
# (a transaction or a fence stuck across a broker restart: aiokafka waits for ever where
# Java's client stops at max.block.ms) fails the router, which its supervisor restarts:
# the new producers fence the stuck transaction and the batch is routed again.
STUCK_SECONDS = 60.0


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
    Outcome.BLOCKED: "blocked",
}


def _decision_message(
    topics: Topics, decision: RoutingDecision, key: bytes, at: datetime, schema_base_url: str
) -> Outgoing:
    value = encode(
        "RoutingDecision",
        models.RoutingDecision(
            event_id=decision.event_id,
            event_type=decision.event_type,
            agency=decision.agency,
            outcome=decision.outcome.value,
            legal_basis=decision.legal_basis,
            decided_at=at,
            fields_delivered=sorted(decision.fields_delivered),
            fields_withheld=sorted(decision.fields_withheld),
        ).avro(),
    )
    headers = headers_for(
        value,
        id=f"{decision.event_id}/{decision.agency}",
        source="/router",
        subject=key.decode(errors="replace"),
        time=at,
        schema_base_url=schema_base_url,
    )
    return Outgoing(topics.routing_decisions, key, value, headers)


async def plan(
    pool: asyncpg.Pool,
    topics: Topics,
    records: list[ConsumerRecord[bytes, bytes]],
    schema_base_url: str,
    give_up_on: frozenset[int] = frozenset(),
    *,
    keys: KeyRing,
    tally: RoutingTally | None = None,
) -> list[Outgoing]:
    """Everything one batch of life events should produce, decided now; what it
    decided is added to ``tally``, for the caller to count once it has committed."""
    outgoing: list[Outgoing] = []
    decoded: list[Incoming] = []
    tally = tally if tally is not None else RoutingTally()

    def reject(record: ConsumerRecord[bytes, bytes], exc: UnroutableEvent) -> None:
        letter = dead_letter(record, COMPONENT, str(exc))
        outgoing.append(Outgoing(topics.dead_letters, letter.key, letter.value, letter.headers))
        tally.dead_letters += 1
        log.warning(
            "event_dead_lettered",
            event_id=_header(record, "ce_id"),
            partition=record.partition,
            offset=record.offset,
            reason=str(exc),
        )

    for record in records:
        try:
            incoming = messages.routable(record)
            target = _header(record, REDELIVER_TO)
            if (record.topic == topics.redeliveries) != (target is not None):
                raise UnroutableEvent(
                    f"{REDELIVER_TO} belongs on every {topics.redeliveries} message, and only there"
                )
            decoded.append(replace(incoming, redeliver_to=target))
        except UnroutableEvent as exc:
            reject(record, exc)
    # One key registry read at most per batch, and only for a key not seen before.
    known = await keys.resolve({i.signed.manifest.key_id for i in decoded})
    routable: list[Incoming] = []
    for incoming in decoded:
        try:
            verify_signature(incoming, known)
        except UnroutableEvent as exc:
            reject(incoming.record, exc)
            continue
        routable.append(incoming)
    if not routable:
        return outgoing
    # Consent is read at decision time, inside this batch, never cached. The decision
    # time is the database's clock, taken before the read, so any consent change the
    # read did not see is stamped later than the decision that did not see it.
    async with pool.acquire() as conn:
        now: datetime = await conn.fetchval("SELECT clock_timestamp()")
        subscriptions = await load_subscriptions(conn)
        consent = await current_consent(
            conn,
            [(i.event.subject_id, i.follows[1] if i.follows else i.event.event_type) for i in routable],
        )
        originals = await original_deliveries(
            conn,
            [i.follows[0] for i in routable if i.follows]
            + [i.event.event_id for i in routable if i.redeliver_to and not i.follows],
        )
        # Consent for a correction is the consent for its original's recorded type.
        recorded_types = [
            (i.event.subject_id, originals[i.follows[0]].event_type)
            for i in routable
            if i.follows and originals and i.follows[0] in originals
        ]
        consent.update(await current_consent(conn, recorded_types))
    # Each line about one event names it (event_id=...) itself: binding it in contextvars
    # for every event would cost the hot path more than the lines are worth.
    for incoming in routable:
        produced = _route_one(
            incoming, topics, subscriptions, consent, originals, now, schema_base_url, give_up_on, tally
        )
        if incoming.redeliver_to is not None:
            produced = _redelivery(incoming, produced, topics.agency(incoming.redeliver_to))
        outgoing += produced
    return outgoing


def _header(record: ConsumerRecord[bytes, bytes], name: str) -> str | None:
    return next((v.decode(errors="replace") for k, v in record.headers if k == name), None)


def _redelivery(incoming: Incoming, produced: list[Outgoing], topic: str) -> list[Outgoing]:
    """An operator's redelivery: only the named agency's copy, and only if today's
    subscriptions and consent still allow it. The first delivery's routing decision
    stands in the audit chain; the request itself is recorded in ``redelivery``."""
    copies = [o for o in produced if o.topic == topic]
    log.info(
        "event_redelivered" if copies else "redelivery_withheld",
        event_id=incoming.event.event_id,
        agency=incoming.redeliver_to,
        redelivery=_header(incoming.record, REDELIVERY_ID),
    )
    return copies


def _as_redelivered(
    decisions: list[RoutingDecision], agency: str, original: OriginalEvent | None
) -> list[RoutingDecision]:
    """The named agency's decision only, if it is still entitled today, and never with
    more fields than its first delivery carried (a subscription widened since then
    does not reach back into earlier events)."""
    first = (
        next((d.fields_delivered for d in original.deliveries if d.agency == agency), None)
        if original
        else None
    )
    if first is None:
        return []
    return [
        replace(
            d,
            fields_delivered=d.fields_delivered & first,
            fields_withheld=d.fields_withheld | (d.fields_delivered - first),
        )
        for d in decisions
        if d.agency == agency and d.delivers
    ]


def _route_one(
    incoming: Incoming,
    topics: Topics,
    subscriptions: list[Subscription],
    consent: dict[tuple[str, str], dict[str, ConsentState]],
    originals: dict[str, OriginalEvent] | None,
    now: datetime,
    schema_base_url: str,
    give_up_on: frozenset[int],
    tally: RoutingTally,
) -> list[Outgoing]:
    event = incoming.event
    if incoming.follows is not None:
        return _follow_up(
            topics,
            incoming,
            subscriptions,
            consent,
            originals,
            now,
            schema_base_url,
            tally,
            give_up=incoming.record.offset in give_up_on,
        )
    outgoing: list[Outgoing] = []
    copies: dict[frozenset[str], Outgoing] = {}  # agencies granted the same fields share one encoding
    decisions = decide(
        event, subscriptions, consent.get((event.subject_id, event.event_type), {}), now, POLICY
    )
    if incoming.redeliver_to is not None:
        original = originals.get(event.event_id) if originals else None
        decisions = _as_redelivered(decisions, incoming.redeliver_to, original)
    tally.decided(event.event_type, decisions, redelivery=incoming.redeliver_to is not None)
    for decision in decisions:
        if decision.delivers:
            if decision.fields_delivered not in copies:
                copies[decision.fields_delivered] = agency_copy(topics, incoming, decision, schema_base_url)
            shared = copies[decision.fields_delivered]
            outgoing.append(
                Outgoing(topics.agency(decision.agency), shared.key, shared.value, shared.headers)
            )
        if incoming.redeliver_to is None:  # a redelivery is recorded in PostgreSQL, not as a new decision
            outgoing.append(
                _decision_message(topics, decision, incoming.record.key or b"", now, schema_base_url)
            )
    log.debug(
        "event_routed",
        event_id=event.event_id,
        event_type=event.event_type,
        delivered=[d.agency for d in decisions if d.delivers],
    )
    return outgoing


class OriginalNotYetDecided(Exception):
    """A correction or void arrived before its original's decisions were recorded."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


def _follow_up(
    topics: Topics,
    incoming: Incoming,
    subscriptions: list[Subscription],
    consent: dict[tuple[str, str], dict[str, ConsentState]],
    originals: dict[str, OriginalEvent] | None,
    now: datetime,
    schema_base_url: str,
    tally: RoutingTally,
    give_up: bool,
) -> list[Outgoing]:
    """A correction or void: to the original's recipients only, judged on the
    original's recorded type, within the fields (and NINO) each received."""
    assert incoming.follows is not None and originals is not None
    original_id, claimed_type = incoming.follows
    event, record = incoming.event, incoming.record
    original = originals.get(original_id)
    if original is None and not give_up:
        raise OriginalNotYetDecided(record.offset)
    reason = None
    if original is None:
        reason = f"original event {original_id} has no recorded routing decisions"
    elif original.event_type != claimed_type:
        reason = f"it names the original as {claimed_type} but {original_id} was {original.event_type}"
    if reason is not None or original is None:
        letter = dead_letter(record, COMPONENT, reason or "unknown original")
        tally.dead_letters += 1
        log.warning(
            "event_dead_lettered",
            event_id=event.event_id,
            partition=record.partition,
            offset=record.offset,
            reason=reason,
        )
        return [Outgoing(topics.dead_letters, letter.key, letter.value, letter.headers)]
    decisions = decide_follow_up(
        event,
        original.event_type,
        original.deliveries,
        {s.agency for s in subscriptions},
        consent.get((event.subject_id, original.event_type), {}),
        POLICY,
    )
    if incoming.redeliver_to is None:
        tally.decided(event.event_type, decisions, redelivery=False)
    else:  # only the named agency's copy is sent (see _redelivery)
        tally.decided(event.event_type, [d for d in decisions if d.agency == incoming.redeliver_to], True)
    out: list[Outgoing] = []
    for decision in decisions:
        if decision.delivers:
            out.append(agency_copy(topics, incoming, decision, schema_base_url))
        out.append(_decision_message(topics, decision, record.key or b"", now, schema_base_url))
    log.debug(
        "event_routed",
        event_id=event.event_id,
        event_type=event.event_type,
        delivered=[d.agency for d in decisions if d.delivers],
    )
    return out


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
        self.consumer = kafka.consumer(
            settings,
            principal=Principal.ROUTER,
            group_id=self.group_id,
            client_id="tuo-router",
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
                producer = self.producers.pop(tp, None)
                if producer is not None:
                    await producer.stop()
            log.info("router_partitions_revoked", partitions=sorted(tp.partition for tp in revoked))

    async def partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        try:
            await _within(STUCK_SECONDS, self._take_over(assigned), "taking over partitions")
        except Exception as exc:  # noqa: BLE001 - aiokafka would only log it; make the router restart
            self.assignment_failed = exc

    async def _take_over(self, assigned: set[TopicPartition]) -> None:
        async with self.lock:
            self.assignments += 1
            for tp in assigned - set(self.producers):
                producer = kafka.producer(
                    self.settings,
                    principal=Principal.ROUTER,
                    client_id="tuo-router",
                    transactional_id=self.transactional_id(tp),
                )
                await producer.start()  # InitProducerId: fences and settles the old owner
                self.producers[tp] = producer
            for tp in assigned:
                # Read after the fence: the old owner's last transaction has settled, so this
                # includes its offsets (an offset fetched earlier could predate them).
                committed = await self.consumer.committed(tp)
                if committed is None:
                    committed = (await self.consumer.beginning_offsets([tp]))[tp]
                self.next_offset[tp] = committed
                self.consumer.seek(tp, committed)
            log.info("router_partitions_assigned", partitions=sorted(tp.partition for tp in assigned))

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
            while not stop.is_set():
                epoch = self.assignments
                batches = await self.consumer.getmany(timeout_ms=500, max_records=500)
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
                    await _within(
                        STUCK_SECONDS,
                        asyncio.gather(*(self._route(tp, records) for tp, records in batches.items())),
                        "routing a batch",
                    )
        finally:
            LAG.forget(self.consumer)
            for client in (self.consumer, *self.producers.values()):
                try:
                    await _within(STUCK_SECONDS, client.stop(), "stopping a Kafka client")
                except RouterStuck:
                    log.warning("router_client_not_stopped", client=type(client).__name__)
            self.producers.clear()

    async def _route(self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        producer = self.producers.get(tp)
        if producer is None or tp not in self.next_offset:
            return  # no longer ours; the new owner reads from the committed offset
        records = [r for r in records if r.offset >= self.next_offset[tp]]  # never route twice
        if not records:
            return
        tally = RoutingTally()
        try:
            if tp.topic == self.topics.consent_changes:
                outgoing, tally.dead_letters = await notices(
                    self.pool, self.topics, records, keys=self.consent_keys
                )
            else:
                outgoing = await plan(
                    self.pool,
                    self.topics,
                    records,
                    self.settings.schema_base_url(),
                    self._overdue(tp),
                    keys=self.keys,
                    tally=tally,
                )
        except OriginalNotYetDecided as waiting:
            # Its original's decisions are not recorded yet (the tracker lags, or the
            # original is earlier in this very batch): route what comes before it,
            # then rewind to it and try again shortly.
            self.waiting_since.setdefault((tp, waiting.offset), time.monotonic())
            before = [r for r in records if r.offset < waiting.offset]
            if before:
                await self._route(tp, before)
            self.consumer.seek(tp, waiting.offset)
            await asyncio.sleep(0.5)
            return
        hashed: dict[tuple[int, bytes | None], int] = {}  # one key is hashed once, not once per copy
        sent: list[asyncio.Future[object]] = []
        try:
            async with producer.transaction():
                for message in outgoing:
                    count = await self._partition_count(producer, message.topic)
                    if (count, message.key) not in hashed:
                        hashed[(count, message.key)] = (
                            0
                            if count == 1 or message.key is None
                            else (murmur2(message.key) & 0x7FFFFFFF) % count
                        )
                    sent.append(
                        await producer.send(
                            message.topic,
                            value=message.value,
                            key=message.key,
                            headers=message.headers,
                            partition=hashed[(count, message.key)],
                        )
                    )
                await producer.send_offsets_to_transaction({tp: records[-1].offset + 1}, self.group_id)
        finally:
            # The commit (or the abort) has settled every send; a failed one is reported by
            # the transaction itself, so only mark its error as seen (no "never retrieved").
            for future in sent:
                if future.done() and not future.cancelled():
                    future.exception()
        tally.count()  # committed
        self.next_offset[tp] = records[-1].offset + 1
        for key in [k for k in self.waiting_since if k[0] == tp and k[1] < self.next_offset[tp]]:
            del self.waiting_since[key]


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
