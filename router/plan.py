"""The routing pipeline for each life event, written once: the router (``router.service``)
and replay (``operators.replay``) both decide through it.

For each event, in this order:

1. **Read** the message (``router.messages.routable``): a life event whose CloudEvents
   headers and key agree with its envelope, and which carries an office signature.
2. **Verify** the office's signature over the whole event (``verify_signatures``), with
   the offices' keys resolved once per batch. Nothing unsigned is decided on.
3. **Read what the decision depends on** (``read_inputs``), on one connection, for this
   batch, never cached, in this order:

   a. the decision clock, the database's ``clock_timestamp()``;
   b. the subscriptions;
   c. for a correction or void (and a redelivery), its original: the type recorded for
      it and who received it;
   d. consent, per subject and event type; for a correction or void, the type recorded
      for its original, not the type it claims (a withdrawal is for the kind of event
      the citizen was told about, and a correction cannot step round it by naming another).
4. **Decide** with ``router.rules`` and the sensitive-domain ``POLICY``: ``decide_on`` for
   an event, ``decide_on_follow_up`` for a correction or void.

Why that order keeps the citizen's guarantee ("once a withdrawal is confirmed, no routing
decision made after it delivers to that agency, including replays"). A withdrawal is
confirmed at the database's clock after its transaction has committed
(``router.store.record_consent``). The decision clock is read before consent, and a
statement sees every transaction committed before it began. So a withdrawal the consent
read did not see committed after that read began, which is after the decision clock: its
confirmation is stamped later than the decision, a decision made before it. Every decision
stamped after a confirmed withdrawal has read it. Reading consent before the clock, or
keeping it from one batch to the next, would break this; replay reads through this same
function for every batch, so the guarantee holds for replays too.

The rest of this module is the router's plan for one batch (``plan_batch``): the messages
it produces (agency copies, routing decisions, dead letters) and what it decided, for the
metrics. ``router.service`` sends them in one Kafka transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol

import asyncpg
import structlog
from aiokafka.structs import ConsumerRecord

from router import messages
from router.messages import Incoming, Outgoing, UnroutableEvent, agency_copy, verify_signature
from router.minimise import Copies
from router.policy import POLICY
from router.rules import (
    ConsentState,
    RoutableEvent,
    RoutingDecision,
    Subscription,
    decide,
    decide_follow_up,
)
from router.store import (
    OriginalEvent,
    current_consent,
    load_subscriptions,
    original_deliveries,
    registered_interest,
)
from runtime.dead_letters import dead_letter
from runtime.kafka import Topics
from runtime.keyring import KeyRing
from schemas.catalogue import active
from schemas.cloudevents import REDELIVER_TO, REDELIVERY_ID, HeaderTemplate
from schemas.codec import avro_string, field_writer

log = structlog.get_logger(__name__)
COMPONENT = "router"  # what the router's dead letters are written by
YIELD_EVERY = 100  # events
DECISION = "RoutingDecision"
DECISION_SOURCE = "/router"

# Reads the originals of these event ids: the router's recorded decisions, or for a
# replay, how the original reached the one agency replayed to.
OriginalsReader = Callable[[asyncpg.Connection, list[str]], Awaitable[dict[str, OriginalEvent]]]


class Decidable(Protocol):
    """An event as a decision sees it: ``router.messages.Incoming`` as the router reads
    it, or ``router.facts.RoutingFacts`` as a replay keeps it."""

    @property
    def event(self) -> RoutableEvent: ...

    @property
    def follows(self) -> tuple[str, str] | None: ...

    @property
    def redeliver_to(self) -> str | None: ...


@dataclass(frozen=True)
class DecisionInputs:
    """What a batch's decisions are made on, read by ``read_inputs`` in the order above."""

    now: datetime  # the decision clock, read first; the decisions are stamped with it
    subscriptions: list[Subscription]
    originals: dict[str, OriginalEvent]  # by event id, for corrections, voids and redeliveries
    consent: dict[tuple[str, str], dict[str, ConsentState]]  # (subject, type) → agency → choice
    # subject → the agencies that registered an interest in it (read only when a
    # subscription is scoped to registered subjects)
    interest: dict[str, frozenset[str]] = field(default_factory=dict)

    def consent_for(self, subject_id: str, event_type: str) -> Mapping[str, ConsentState]:
        return self.consent.get((subject_id, event_type), {})

    def interested_in(self, subject_id: str) -> frozenset[str]:
        return self.interest.get(subject_id, frozenset())


async def verify_signatures(keys: KeyRing, incoming: Sequence[Incoming]) -> list[UnroutableEvent | None]:
    """Why each event's office signature fails, or ``None`` where it holds. One key
    registry read at most, and only for a key not seen before."""
    known = await keys.resolve({i.signed.manifest.key_id for i in incoming})
    failures: list[UnroutableEvent | None] = []
    for n, item in enumerate(incoming, 1):
        await _now_and_then(n)
        try:
            verify_signature(item, known)
        except UnroutableEvent as exc:
            failures.append(exc)
        else:
            failures.append(None)
    return failures


def _judged_as(incoming: Decidable, originals: Mapping[str, OriginalEvent]) -> str:
    """The event type consent is read for: a correction's or void's original's recorded type."""
    if incoming.follows is not None and incoming.follows[0] in originals:
        return originals[incoming.follows[0]].event_type
    return incoming.event.event_type


async def read_inputs(
    conn: asyncpg.Connection,
    incoming: Sequence[Decidable],
    originals_of: OriginalsReader,
    *,
    agency: str | None = None,
) -> DecisionInputs:
    """The clock, then subscriptions, originals and consent, for deciding on ``incoming``
    now (the module docstring says why in this order). With ``agency``, only its
    subscriptions are kept: a replay decides for that one agency."""
    now: datetime = await conn.fetchval("SELECT clock_timestamp()")
    subscriptions = await load_subscriptions(conn)
    if agency is not None:
        subscriptions = [s for s in subscriptions if s.agency == agency]
    wanted = [i.follows[0] for i in incoming if i.follows] + [
        i.event.event_id for i in incoming if i.redeliver_to and not i.follows
    ]
    originals = await originals_of(conn, wanted) if wanted else {}
    consent = await current_consent(conn, [(i.event.subject_id, _judged_as(i, originals)) for i in incoming])
    interest: dict[str, frozenset[str]] = {}
    if any(s.condition.registered_subjects for s in subscriptions):
        interest = await registered_interest(conn, {i.event.subject_id for i in incoming})
    return DecisionInputs(now, subscriptions, originals, consent, interest)


def decide_on(incoming: Decidable, inputs: DecisionInputs) -> list[RoutingDecision]:
    """One decision per subscribed agency: whether it gets the event, and which fields."""
    event = incoming.event
    return decide(
        event,
        inputs.subscriptions,
        inputs.consent_for(event.subject_id, event.event_type),
        inputs.now,
        POLICY,
        inputs.interested_in(event.subject_id),
    )


def decide_on_follow_up(
    incoming: Decidable, original: OriginalEvent, agencies: Iterable[str], inputs: DecisionInputs
) -> list[RoutingDecision]:
    """A correction or void, judged on its original's recorded type: one decision per
    agency asked about; it goes only where the original went, within what it carried."""
    event = incoming.event
    return decide_follow_up(
        event,
        original.event_type,
        original.deliveries,
        agencies,
        inputs.consent_for(event.subject_id, original.event_type),
        POLICY,
    )


# The router's batch


class OriginalNotYetDecided(Exception):
    """A correction or void arrived before its original's decisions were recorded."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


@dataclass(frozen=True)
class Decided:
    """One event's decisions as the metrics count them."""

    event_type: str
    decisions: list[RoutingDecision]
    redelivery: bool  # a further copy of an event routed before


@dataclass
class BatchPlan:
    """Everything one batch of life events should produce, and what it decided: for the
    caller to count once the batch's transaction has committed."""

    outgoing: list[Outgoing] = field(default_factory=list)
    decided: list[Decided] = field(default_factory=list)
    dead_letters: int = 0

    def dead_letter(
        self, topics: Topics, record: ConsumerRecord[bytes, bytes], reason: str, event_id: str | None
    ) -> Outgoing:
        """The dead letter for a record that cannot be routed, counted and logged."""
        letter = dead_letter(record, COMPONENT, reason)
        self.dead_letters += 1
        log.warning(
            "event_dead_lettered",
            event_id=event_id,
            partition=record.partition,
            offset=record.offset,
            reason=reason,
        )
        return Outgoing(topics.dead_letters, letter.key, letter.value, letter.headers)


async def plan_batch(
    pool: asyncpg.Pool,
    topics: Topics,
    records: list[ConsumerRecord[bytes, bytes]],
    schema_base_url: str,
    give_up_on: frozenset[int] = frozenset(),
    *,
    keys: KeyRing,
) -> BatchPlan:
    """Everything one batch of life events and redeliveries should produce, decided now.
    ``give_up_on``: offsets of corrections that have waited long enough for their original
    (they are dead-lettered rather than raising ``OriginalNotYetDecided`` again)."""
    plan = BatchPlan()
    decoded: list[Incoming] = []
    for n, record in enumerate(records, 1):
        await _now_and_then(n)
        try:
            incoming = messages.routable(record)
            target = _header(record, REDELIVER_TO)
            if (record.topic == topics.redeliveries) != (target is not None):
                raise UnroutableEvent(
                    f"{REDELIVER_TO} belongs on every {topics.redeliveries} message, and only there"
                )
            decoded.append(replace(incoming, redeliver_to=target))
        except UnroutableEvent as exc:
            plan.outgoing.append(plan.dead_letter(topics, record, str(exc), _header(record, "ce_id")))
    routable: list[Incoming] = []
    for incoming, failure in zip(decoded, await verify_signatures(keys, decoded), strict=True):
        if failure is None:
            routable.append(incoming)
        else:
            letter = plan.dead_letter(
                topics, incoming.record, str(failure), _header(incoming.record, "ce_id")
            )
            plan.outgoing.append(letter)
    if not routable:
        return plan
    async with pool.acquire() as conn:
        inputs = await read_inputs(conn, routable, original_deliveries)
    # Each line about one event names it (event_id=...) itself: binding it in contextvars
    # for every event would cost the hot path more than the lines are worth.
    writer = DecisionWriter(topics, inputs.now, schema_base_url)
    for n, incoming in enumerate(routable, 1):
        await _now_and_then(n)
        produced = _route_one(plan, incoming, topics, inputs, writer, give_up_on)
        if incoming.redeliver_to is not None:
            produced = _redelivery(incoming, produced, topics.agency(incoming.redeliver_to))
        plan.outgoing += produced
    return plan


async def _now_and_then(n: int) -> None:
    """Let the event loop run between events: a batch is seconds of CPU, and the Kafka
    consumer's heartbeats must go on meanwhile, or the group counts the router as dead."""
    if n % YIELD_EVERY == 0:
        await asyncio.sleep(0)


def _header(record: ConsumerRecord[bytes, bytes], name: str) -> str | None:
    return next((v.decode(errors="replace") for k, v in record.headers if k == name), None)


class DecisionWriter:
    """A batch's routing-decision messages, all stamped with its decision time: the
    ``ce_*`` headers made once, and each value without a pydantic model (the bytes are
    what ``models.RoutingDecision(...).avro()`` encodes; a test holds them side by side).
    A decision's record is its event id, then fields that many decisions of the batch
    share (type, agency, outcome, basis, time, fields): those are encoded once per batch."""

    def __init__(self, topics: Topics, at: datetime, schema_base_url: str) -> None:
        entry = active().latest(DECISION)
        self.topic = topics.routing_decisions
        self.at = at
        self.schema_base_url = schema_base_url
        self.headers = HeaderTemplate(
            type=entry.name,
            source=DECISION_SOURCE,
            time=at,
            dataschema=f"{schema_base_url.rstrip('/')}/schemas/ids/{entry.schema_id}",
        )
        self._writer = field_writer(DECISION)
        if self._writer.names[0] != "event_id":
            raise ValueError(f"{DECISION} no longer begins with its event id; DecisionWriter must change")
        self._framing = self._writer.join(())
        self._rest: dict[tuple[Any, ...], bytes] = {}

    def message(self, decision: RoutingDecision, key: bytes) -> Outgoing:
        shared = (
            decision.event_type,
            decision.agency,
            decision.outcome,
            decision.legal_basis,
            decision.fields_delivered,
            decision.fields_withheld,
            decision.subscription_version,
        )
        rest = self._rest.get(shared)
        if rest is None:
            values = {
                "event_type": decision.event_type,
                "agency": decision.agency,
                "outcome": decision.outcome.value,
                "legal_basis": decision.legal_basis,
                "decided_at": self.at,
                "fields_delivered": sorted(decision.fields_delivered),
                "fields_withheld": sorted(decision.fields_withheld),
                "subscription_version": decision.subscription_version,
            }
            rest = self._rest[shared] = b"".join(
                self._writer.field(n, values[n]) for n in self._writer.names[1:]
            )
        value = self._framing + avro_string(decision.event_id) + rest
        headers = self.headers.headers(f"{decision.event_id}/{decision.agency}", key.decode(errors="replace"))
        return Outgoing(self.topic, key, value, headers)


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
    plan: BatchPlan,
    incoming: Incoming,
    topics: Topics,
    inputs: DecisionInputs,
    writer: DecisionWriter,
    give_up_on: frozenset[int],
) -> list[Outgoing]:
    event = incoming.event
    if incoming.follows is not None:
        return _follow_up(
            plan, topics, incoming, inputs, writer, give_up=incoming.record.offset in give_up_on
        )
    outgoing: list[Outgoing] = []
    copies: dict[frozenset[str], Outgoing] = {}  # agencies granted the same fields share one encoding
    cut = Copies(event.event_type, incoming.body, incoming.record.value)  # spliced from the event's bytes
    decisions = decide_on(incoming, inputs)
    if incoming.redeliver_to is not None:
        decisions = _as_redelivered(decisions, incoming.redeliver_to, inputs.originals.get(event.event_id))
    plan.decided.append(Decided(event.event_type, decisions, redelivery=incoming.redeliver_to is not None))
    for decision in decisions:
        if decision.delivers:
            if decision.fields_delivered not in copies:
                copy = agency_copy(topics, incoming, decision, writer.schema_base_url, cut)
                copies[decision.fields_delivered] = copy
            shared = copies[decision.fields_delivered]
            outgoing.append(
                Outgoing(topics.agency(decision.agency), shared.key, shared.value, shared.headers)
            )
        if incoming.redeliver_to is None:  # a redelivery is recorded in PostgreSQL, not as a new decision
            outgoing.append(writer.message(decision, incoming.record.key or b""))
    _routed(event, decisions)
    return outgoing


def _follow_up(
    plan: BatchPlan,
    topics: Topics,
    incoming: Incoming,
    inputs: DecisionInputs,
    writer: DecisionWriter,
    give_up: bool,
) -> list[Outgoing]:
    """A correction or void: to the original's recipients only, judged on the
    original's recorded type, within the fields (and NINO) each received."""
    assert incoming.follows is not None
    original_id, claimed_type = incoming.follows
    event, record = incoming.event, incoming.record
    original = inputs.originals.get(original_id)
    if original is None and not give_up:
        raise OriginalNotYetDecided(record.offset)
    reason = None
    if original is None:
        reason = f"original event {original_id} has no recorded routing decisions"
    elif original.event_type != claimed_type:
        reason = f"it names the original as {claimed_type} but {original_id} was {original.event_type}"
    if reason is not None or original is None:
        # Returned like the event's other messages (of a redelivery, _redelivery keeps only
        # the agency's copies).
        return [plan.dead_letter(topics, record, reason or "unknown original", event.event_id)]
    decisions = decide_on_follow_up(incoming, original, {s.agency for s in inputs.subscriptions}, inputs)
    if incoming.redeliver_to is None:
        plan.decided.append(Decided(event.event_type, decisions, redelivery=False))
    else:  # only the named agency's copy is sent (see _redelivery)
        plan.decided.append(
            Decided(event.event_type, [d for d in decisions if d.agency == incoming.redeliver_to], True)
        )
    out: list[Outgoing] = []
    for decision in decisions:
        if decision.delivers:
            out.append(agency_copy(topics, incoming, decision, writer.schema_base_url))
        out.append(writer.message(decision, record.key or b""))
    _routed(event, decisions)
    return out


def _routed(event: RoutableEvent, decisions: list[RoutingDecision]) -> None:
    log.debug(
        "event_routed",
        event_id=event.event_id,
        event_type=event.event_type,
        delivered=[d.agency for d in decisions if d.delivers],
    )
