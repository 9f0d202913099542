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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.partitioner import murmur2
from aiokafka.structs import ConsumerRecord, TopicPartition

from consumers.keys import KeyRing
from consumers.redelivery import REDELIVER_TO, REDELIVERY_ID
from router.minimise import NINO, event_fields, minimise
from router.policy import POLICY
from router.rules import (
    ConsentState,
    RoutableEvent,
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
from runtime.settings import Settings
from schemas import UndecodableMessage, decode, encode, models
from schemas.catalogue import DELIVERY_SUFFIX, LIFE_EVENTS, MINIMISED
from schemas.cloudevents import CloudEvent, MissingCloudEventHeader, headers_for
from schemas.signatures import (
    ENVELOPE,
    SIGNATURE_HEADERS,
    OfficeKey,
    SignatureRejected,
    SignedEvent,
    element_item,
    read_signature,
    verify,
)

log = structlog.get_logger(__name__)
COMPONENT = "router"
OPERATOR_HEADERS = (REDELIVER_TO, REDELIVERY_ID)  # meant for the router, never passed on
ORIGINAL_WAIT_SECONDS = 60.0  # then a correction whose original is unknown is dead-lettered


@dataclass(frozen=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


class UnroutableEvent(ValueError):
    """A life-events message that cannot be routed; it goes to dead letters."""


@dataclass(frozen=True)
class Incoming:
    record: ConsumerRecord[bytes, bytes]
    event: RoutableEvent
    body: dict[str, Any]
    source: str  # ce_source: the office the event claims to come from
    signed: SignedEvent  # the office's signature, verified before the event is routed
    follows: tuple[str, str] | None = None  # (original event id, its type) for corrections and voids
    redeliver_to: str | None = None  # an operator's redelivery: the one agency it is for


FOLLOW_UPS = {
    "EventCorrected": ("corrects_event_id", "corrected_event_type"),
    "EventVoided": ("voids_event_id", "voided_event_type"),
}


# The addresses an area condition looks at: where the subject lives or lived, never
# where an executor, next of kin or partner lives.
SUBJECT_ADDRESSES = {
    "BirthRegistered": ("home_address",),
    "DeathRegistered": ("last_address",),
    "AddressChanged": ("old_address", "new_address"),
}


def _postcodes(event_type: str, body: dict[str, Any]) -> Iterator[str]:
    for field in SUBJECT_ADDRESSES.get(event_type, ()):
        address = body.get(field)
        if isinstance(address, dict) and isinstance(address.get("postcode"), str):
            yield address["postcode"]


def _routable(record: ConsumerRecord[bytes, bytes]) -> Incoming:
    try:
        cloud_event = CloudEvent.from_headers(record.headers)
        subject, body = decode(record.value or b"")
    except (MissingCloudEventHeader, UndecodableMessage, ValueError) as exc:
        raise UnroutableEvent(str(exc)) from exc
    envelope = body.get("envelope")
    if not isinstance(envelope, dict):
        raise UnroutableEvent(f"{subject} is not a life event (no envelope)")
    if subject != cloud_event.type:
        raise UnroutableEvent(f"ce_type says {cloud_event.type} but the value is {subject}")
    if str(envelope["event_id"]) != cloud_event.id:
        raise UnroutableEvent("ce_id does not match the envelope's event_id")
    subject_id = envelope["subject"]["subject_id"]
    if record.key is None or record.key.decode(errors="replace") != subject_id:
        raise UnroutableEvent("message key is not the envelope's subject_id")
    if subject not in LIFE_EVENTS:
        raise UnroutableEvent(f"{subject} is not a life event")
    try:
        signed = read_signature(record.headers)
    except SignatureRejected as exc:
        raise UnroutableEvent(str(exc)) from exc
    if subject in FOLLOW_UPS:
        id_field, type_field = FOLLOW_UPS[subject]
        event = RoutableEvent(event_id=cloud_event.id, event_type=subject, subject_id=subject_id)
        return Incoming(
            record, event, body, cloud_event.source, signed, follows=(str(body[id_field]), body[type_field])
        )
    event = RoutableEvent(
        event_id=cloud_event.id,
        event_type=subject,
        subject_id=subject_id,
        fields=event_fields(body),
        postcodes=frozenset(_postcodes(subject, body)),
    )
    return Incoming(record, event, body, cloud_event.source, signed)


def _verify(incoming: Incoming, keys: Mapping[str, OfficeKey]) -> None:
    """The whole event, exactly as the office signed it: every signed item present and intact."""
    try:
        verify(
            incoming.signed,
            keys.get(incoming.signed.manifest.key_id),
            event_type=incoming.event.event_type,
            event_id=incoming.event.event_id,
            source=incoming.source,
            body=incoming.body,
            complete=True,
        )
    except SignatureRejected as exc:
        raise UnroutableEvent(str(exc)) from exc


def _agency_copy(
    topics: Topics, incoming: Incoming, decision: RoutingDecision, schema_base_url: str
) -> Outgoing:
    """The agency's message: minimised where the event type has a delivery schema."""
    event = incoming.event
    if event.event_type not in MINIMISED:
        return Outgoing(
            topics.agency(decision.agency),
            incoming.record.key,
            incoming.record.value,
            [(k, v) for k, v in incoming.record.headers if k not in OPERATOR_HEADERS],
        )
    value = encode(f"{event.event_type}{DELIVERY_SUFFIX}", minimise(incoming.body, decision.fields_delivered))
    original = CloudEvent.from_headers(incoming.record.headers)
    headers = headers_for(
        value,
        id=event.event_id,
        type=event.event_type,
        source=original.source,
        subject=event.subject_id,
        time=original.time or datetime.now(UTC),
        schema_base_url=schema_base_url,
    )
    # The office's signature travels on, with the salts of the delivered items only:
    # the agency can check what it got and learns nothing about what it did not.
    headers += incoming.signed.headers(disclose={ENVELOPE} | decision.fields_delivered)
    return Outgoing(topics.agency(decision.agency), incoming.record.key, value, headers)


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
) -> list[Outgoing]:
    """Everything one batch of life events should produce, decided now."""
    outgoing: list[Outgoing] = []
    decoded: list[Incoming] = []

    def reject(record: ConsumerRecord[bytes, bytes], exc: UnroutableEvent) -> None:
        letter = dead_letter(record, COMPONENT, str(exc))
        outgoing.append(Outgoing(topics.dead_letters, letter.key, letter.value, letter.headers))
        log.warning("event_dead_lettered", partition=record.partition, offset=record.offset, reason=str(exc))

    for record in records:
        try:
            incoming = _routable(record)
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
            _verify(incoming, known)
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
    for incoming in routable:
        produced = _route_one(
            incoming, topics, subscriptions, consent, originals, now, schema_base_url, give_up_on
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
    for decision in decisions:
        if decision.delivers:
            if decision.fields_delivered not in copies:
                copies[decision.fields_delivered] = _agency_copy(topics, incoming, decision, schema_base_url)
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
        return [Outgoing(topics.dead_letters, letter.key, letter.value, letter.headers)]
    decisions = decide_follow_up(
        event,
        original.event_type,
        original.deliveries,
        {s.agency for s in subscriptions},
        consent.get((event.subject_id, original.event_type), {}),
        POLICY,
    )
    out: list[Outgoing] = []
    for decision in decisions:
        if decision.delivers:
            body = dict(incoming.body)
            disclosed = set(body) - {"changes"}  # the envelope and the correction's own fields
            if NINO in decision.fields_delivered:
                disclosed.add(NINO)
            else:
                envelope = body["envelope"]
                body["envelope"] = {**envelope, "subject": {**envelope["subject"], "nino": None}}
            if event.event_type == "EventCorrected":  # only changes to fields the agency received
                kept = [
                    i
                    for i, c in enumerate(body["changes"])
                    if c["field"].split(".")[0] in decision.fields_delivered
                ]
                body["changes"] = [body["changes"][i] for i in kept]
                disclosed |= {element_item("changes", i) for i in kept}
            value = encode(event.event_type, body)
            headers = [(k, v) for k, v in record.headers if k not in SIGNATURE_HEADERS + OPERATOR_HEADERS]
            headers += incoming.signed.headers(disclose=disclosed)
            out.append(Outgoing(topics.agency(decision.agency), record.key, value, headers))
        out.append(_decision_message(topics, decision, record.key or b"", now, schema_base_url))
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
            await self._take_over(assigned)
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
            [self.topics.life_events, self.topics.redeliveries], listener=_Rebalance(self)
        )
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
                    await asyncio.gather(*(self._route(tp, records) for tp, records in batches.items()))
        finally:
            await self.consumer.stop()
            for producer in self.producers.values():
                await producer.stop()
            self.producers.clear()

    async def _route(self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        producer = self.producers.get(tp)
        if producer is None or tp not in self.next_offset:
            return  # no longer ours; the new owner reads from the committed offset
        records = [r for r in records if r.offset >= self.next_offset[tp]]  # never route twice
        if not records:
            return
        try:
            outgoing = await plan(
                self.pool,
                self.topics,
                records,
                self.settings.schema_base_url(),
                self._overdue(tp),
                keys=self.keys,
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
        self.next_offset[tp] = records[-1].offset + 1
        for key in [k for k in self.waiting_since if k[0] == tp and k[1] < self.next_offset[tp]]:
            del self.waiting_since[key]


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, router: Router) -> None:
        self.router = router

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.router.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.router.partitions_assigned(assigned)


async def run_router(settings: Settings, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
    await Router(settings, pool).run(stop)
