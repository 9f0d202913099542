"""Dead letters, for operators: read them back and redrive them once their cause is fixed.

A dead letter is a message no component could process, kept with why and where from.

Nothing is dropped: a message that fails to decode or validate is copied to a
dead-letter topic with headers naming the reason, origin and failing component,
and its offset is then committed so the partition keeps moving. The router and
the receipt tracker write ``<prefix>.dead-letters``; each agency's SDK writes its
own ``<prefix>.dead-letters.agency.<agency>``.

``tuo dlq`` reads them back (as the ``tuo-dead-letters`` Kafka user, which may read
the dead-letter topics and nothing else, with no consumer group: it never commits)
and redrives them once their cause is fixed. A dead letter is named by where it
sits: ``bus:0:17`` is partition 0, offset 17 of ``<prefix>.dead-letters``;
``dwp:0:3`` is on dwp's own dead-letter topic. A redrive never sends the dead
letter's own bytes (anyone able to write the topic could have put them there): it
sends the original this bus stored when intake recorded the event, through the
normal path, and records who asked, why and what was done in
``dead_letter_redrive``:

- rejected by the router on the life-events topic: the stored original is written
  to the outbox for the life-events topic again, and the router routes it as new;
- an operator's redelivery the router rejected, or an event an agency's SDK
  could not handle: the stored original is redelivered to that one agency (see
  ``operators.redelivery``; the router re-checks today's subscriptions and consent);
- receipts and routing decisions are not redriven: the agency sends a receipt
  again, the router decides again.

Dead letters are whole events (personal data): nothing here logs or returns a
payload, only its size and the names of its fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import cast

import asyncpg
import structlog
from aiokafka.structs import ConsumerRecord, TopicPartition

from operators.redelivery import RedeliveryRefused, redeliver
from runtime import kafka, outbox
from runtime.access import Principal
from runtime.kafka import Topics
from runtime.outbox import OutboxMessage
from runtime.reasons import NotPlainWords, checked_name, checked_reason
from runtime.settings import Settings
from schemas import UndecodableMessage, decode
from schemas.cloudevents import REDELIVER_TO

log = structlog.get_logger(__name__)

BUS = "bus"  # the id's first part for ``<prefix>.dead-letters``; otherwise an agency's name
READ_TIMEOUT_SECONDS = 30.0


# --- Naming a dead letter ---------------------------------------------------------------

# ASCII only (no other scripts' digits), no leading zeros: one spelling per dead letter.
_ID = re.compile(
    r"(?P<source>[a-z][a-z0-9-]{1,39}):(?P<partition>0|[1-9][0-9]{0,8}):(?P<offset>0|[1-9][0-9]{0,17})",
    re.ASCII,
)
_AGENCY = re.compile(r"[a-z][a-z0-9-]{1,39}", re.ASCII)  # as runtime.access.AGENCY_NAME
_SUBJECT = re.compile(r"[ns]-[0-9a-f]{32}", re.ASCII)  # a pseudonymous subject id


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe to show in a terminal: control characters escaped, cut at ``limit``."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text[:limit])
    return shown + ("…" if len(text) > limit else "")


class NotADeadLetterId(ValueError):
    def __init__(self, text: str) -> None:
        super().__init__(
            f"{printable(text, 60)!r} is not a dead letter's id: use the id `tuo dlq list` shows, "
            "like bus:0:17 (the shared topic) or dwp:0:3 (an agency's), partition:offset in plain digits"
        )


@dataclass(frozen=True, order=True)
class DeadLetterId:
    source: str  # BUS or an agency
    partition: int
    offset: int

    @classmethod
    def parse(cls, text: str) -> DeadLetterId:
        found = _ID.fullmatch(text) if len(text) <= 80 else None
        if found is None:
            raise NotADeadLetterId(text)
        return cls(found["source"], int(found["partition"]), int(found["offset"]))

    def __str__(self) -> str:
        return f"{self.source}:{self.partition}:{self.offset}"

    def topic(self, prefix: str) -> str:
        return dead_letter_topic(prefix, self.source)


def dead_letter_topic(prefix: str, source: str) -> str:
    topics = Topics(prefix)
    return topics.dead_letters if source == BUS else topics.agency_dead_letters(source)


def _source_of(prefix: str, topic: str) -> str | None:
    """BUS, the agency, or None for a topic that is not a dead-letter topic."""
    shared = f"{prefix}.dead-letters"
    if topic == shared:
        return BUS
    agency = topic.removeprefix(f"{shared}.agency.")
    # An agency called "bus" would share the shared topic's ids: its letters are not listed.
    return agency if agency != topic and _AGENCY.fullmatch(agency) and agency != BUS else None


# --- Reading them -----------------------------------------------------------------------


@dataclass(frozen=True)
class Redrive:
    """One redrive of a dead letter, as recorded."""

    action: str  # republished | redelivered
    agency: str | None
    requested_by: str
    reason: str
    requested_at: datetime


@dataclass(frozen=True)
class StoredDeadLetter:
    id: DeadLetterId
    topic: str
    dead_lettered_at: datetime
    component: str | None
    reason: str | None
    origin_topic: str | None
    origin_partition: int | None
    origin_offset: int | None
    event_id: uuid.UUID | None  # ce_id, when it is a UUID
    claimed_id: str | None  # ce_id as written (it may be anything)
    event_type: str | None  # ce_type without the namespace
    key_size: int
    value_size: int
    header_names: list[str]
    headers: dict[str, str] = field(repr=False)  # tuo_* and ce_* only (no signatures)
    value: bytes | None = field(repr=False, default=None)  # personal data: never logged or printed
    redrives: list[Redrive] = field(default_factory=list)

    @property
    def origin(self) -> str:
        if self.origin_topic is None:
            return "unknown"
        return f"{self.origin_topic}:{self.origin_partition}:{self.origin_offset}"

    @property
    def age(self) -> str:
        return age(self.dead_lettered_at)

    def fields(self) -> list[tuple[str, int]]:
        """The names of the event's fields that hold something, with the size of each
        (in characters of its text form): what is there, never what it says."""
        try:
            _, body = decode(self.value or b"")
        except (UndecodableMessage, ValueError, TypeError, KeyError):
            return []
        return [(name, len(str(value))) for name, value in body.items() if value not in (None, [], {})]

    def schema(self) -> str:
        try:
            return decode(self.value or b"")[0]
        except (UndecodableMessage, ValueError, TypeError, KeyError) as exc:
            return f"does not decode ({printable(str(exc), 120)})"


def age(moment: datetime, now: datetime | None = None) -> str:
    seconds = max(0, int(((now or datetime.now(UTC)) - moment).total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {seconds}s" if minutes else f"{seconds}s"


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and re.fullmatch(r"[0-9]{1,19}", text, re.ASCII) else None


def _stored(prefix: str, record: ConsumerRecord[bytes, bytes]) -> StoredDeadLetter:
    source = _source_of(prefix, record.topic)
    assert source is not None
    shown = {
        k: printable(bytes(v).decode("utf-8", errors="replace"), 1000)
        for k, v in record.headers
        if k.startswith(("tuo_", "ce_"))
    }
    claimed = shown.get("ce_id")
    try:
        event_id = uuid.UUID(claimed) if claimed is not None and len(claimed) == 36 else None
    except ValueError:
        event_id = None
    event_type = shown.get("ce_type")
    return StoredDeadLetter(
        id=DeadLetterId(source, record.partition, record.offset),
        topic=record.topic,
        dead_lettered_at=datetime.fromtimestamp(record.timestamp / 1000, UTC),
        component=shown.get("tuo_dlq_component"),
        reason=shown.get("tuo_dlq_reason"),
        origin_topic=shown.get("tuo_dlq_topic"),
        origin_partition=_int(shown.get("tuo_dlq_partition")),
        origin_offset=_int(shown.get("tuo_dlq_offset")),
        event_id=event_id,
        claimed_id=claimed,
        event_type=event_type.rsplit(".", 1)[-1] if event_type else None,
        key_size=len(record.key or b""),
        value_size=len(record.value or b""),
        header_names=[printable(k, 60) for k, _ in record.headers],
        headers=shown,
        value=record.value,
    )


class NoSuchDeadLetter(LookupError):
    """Nothing at that place, or no dead-letter topic for that agency."""


class DeadLettersUnreadable(RuntimeError):
    """Kafka did not give the dead letters in time."""


def _check_source(source: str) -> None:
    if source != BUS and not _AGENCY.fullmatch(source):
        raise NoSuchDeadLetter(f"{printable(source, 60)!r} is not an agency name (or {BUS!r})")


class DeadLetterReader:
    """Reads dead-letter topics from Kafka, read_committed, without a consumer group."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.prefix = settings.topic_prefix
        self.admin = kafka.admin(settings, principal=Principal.DEAD_LETTERS)  # topics' partitions
        self.partitions: dict[str, list[int]] = {}
        self.reading: kafka.AIOKafkaConsumer | None = None  # made when there is something to read

    async def __aenter__(self) -> DeadLetterReader:
        await self.admin.start()
        try:
            # Every dead-letter topic this user may read, with its partitions.
            described = await self.admin.describe_topics()
        except BaseException:
            await self.admin.close()
            raise
        self.partitions = {
            t["topic"]: sorted(p["partition"] for p in t["partitions"])
            for t in described
            if t["error_code"] == 0 and _source_of(self.prefix, t["topic"])
        }
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.reading is not None:
            await self.reading.stop()
        await self.admin.close()

    @property
    def consumer(self) -> kafka.AIOKafkaConsumer:
        assert self.reading is not None, "assigned first"
        return self.reading

    async def _assign(self, partitions: list[TopicPartition]) -> None:
        if self.reading is None:
            reading = kafka.consumer(
                self.settings, principal=Principal.DEAD_LETTERS, group_id=None, client_id="tuo-dlq"
            )
            self.reading = reading  # stopped on the way out, even if it fails to start
            await reading.start()
        self.reading.assign(partitions)

    async def sources(self) -> dict[str, str]:
        """source (BUS or agency) → its dead-letter topic, for those that exist."""
        found = {_source_of(self.prefix, t): t for t in self.partitions}
        return {s: t for s, t in sorted(found.items(), key=lambda i: (i[0] != BUS, i[0] or "")) if s}

    async def topic_of(self, source: str) -> str:
        _check_source(source)
        topic = (await self.sources()).get(source)
        if topic is None:
            raise NoSuchDeadLetter(
                f"there is no dead-letter topic for {source!r}"
                + ("" if source == BUS else " (is the agency onboarded? see `tuo agencies list`)")
            )
        return topic

    async def read(self, topics: Iterable[str], latest: int | None = None) -> list[StoredDeadLetter]:
        """Every dead letter on ``topics``, or about the ``latest`` few of each partition."""
        partitions = [TopicPartition(t, p) for t in topics for p in self.partitions.get(t, [])]
        if not partitions:
            return []
        await self._assign(partitions)
        starts = await self.consumer.beginning_offsets(partitions)
        ends = await self.consumer.end_offsets(partitions)
        for tp in partitions:
            # A transaction's commit marker takes an offset too: twice as many covers it.
            start = starts[tp] if latest is None else max(starts[tp], ends[tp] - 2 * latest)
            self.consumer.seek(tp, start)
        records = await self._until(ends)
        letters = [_stored(self.prefix, r) for r in records]
        letters.sort(key=lambda d: (d.dead_lettered_at, d.id), reverse=True)
        return letters

    async def one(self, letter_id: DeadLetterId) -> StoredDeadLetter:
        topic = await self.topic_of(letter_id.source)
        tp = TopicPartition(topic, letter_id.partition)
        if letter_id.partition not in self.partitions.get(topic, []):
            raise NoSuchDeadLetter(f"{letter_id}: {topic} has no partition {letter_id.partition}")
        await self._assign([tp])
        start = (await self.consumer.beginning_offsets([tp]))[tp]
        end = (await self.consumer.end_offsets([tp]))[tp]
        if not start <= letter_id.offset < end:
            raise NoSuchDeadLetter(
                f"{letter_id}: no such dead letter (partition {letter_id.partition} holds offsets "
                f"{start} to {end - 1})"
                if end > start
                else f"{letter_id}: no such dead letter ({topic} partition {letter_id.partition} is empty)"
            )
        self.consumer.seek(tp, letter_id.offset)
        for record in await self._until({tp: letter_id.offset + 1}):
            if record.offset == letter_id.offset:
                return _stored(self.prefix, record)
        raise NoSuchDeadLetter(
            f"{letter_id}: no dead letter at that offset (a transaction marker or an aborted write takes it)"
        )

    async def _until(self, ends: dict[TopicPartition, int]) -> list[ConsumerRecord[bytes, bytes]]:
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = asyncio.get_running_loop().time() + READ_TIMEOUT_SECONDS
        while [tp for tp, end in ends.items() if await self.consumer.position(tp) < end]:
            if asyncio.get_running_loop().time() > deadline:
                raise DeadLettersUnreadable(
                    f"reading the dead letters took over {READ_TIMEOUT_SECONDS:.0f}s; is Kafka up?"
                )
            batch = await self.consumer.getmany(*ends, timeout_ms=500)
            for tp, part in batch.items():
                records.extend(r for r in part if r.offset < ends[tp])
        return records


async def _with_redrives(pool: asyncpg.Pool, letters: list[StoredDeadLetter]) -> list[StoredDeadLetter]:
    if not letters:
        return letters
    rows = await pool.fetch(
        'SELECT r.topic, r."partition", r."offset", r.action, r.agency, r.requested_by, r.reason,'
        "       r.requested_at"
        "  FROM dead_letter_redrive r"
        '  JOIN unnest($1::text[], $2::int[], $3::bigint[]) AS w(topic, "partition", "offset")'
        '    ON (r.topic, r."partition", r."offset") = (w.topic, w."partition", w."offset")'
        " ORDER BY r.id",
        [d.topic for d in letters],
        [d.id.partition for d in letters],
        [d.id.offset for d in letters],
    )
    done: dict[tuple[str, int, int], list[Redrive]] = {}
    for r in rows:
        done.setdefault((r["topic"], r["partition"], r["offset"]), []).append(
            Redrive(r["action"], r["agency"], r["requested_by"], r["reason"], r["requested_at"])
        )
    return [replace(d, redrives=done.get((d.topic, d.id.partition, d.id.offset), [])) for d in letters]


async def list_dead_letters(
    settings: Settings, pool: asyncpg.Pool, *, agency: str | None = None, limit: int | None = 50
) -> list[StoredDeadLetter]:
    """The most recent dead letters first, from the shared topic and every agency's
    (or only ``agency``'s; ``bus`` for the shared one), with their redrives."""
    if agency is not None:
        _check_source(agency)
    async with DeadLetterReader(settings) as reader:
        topics = [await reader.topic_of(agency)] if agency else list((await reader.sources()).values())
        letters = await reader.read(topics, latest=limit)
    return await _with_redrives(pool, letters[:limit] if limit is not None else letters)


async def subjects_of(pool: asyncpg.Pool, letter: StoredDeadLetter) -> list[str]:
    """Whose records a dead letter holds: the subject intake recorded for its event, else
    the pseudonymous subject its CloudEvents header names (none for a message that is not
    a recorded event and names no subject)."""
    if letter.event_id is not None:
        recorded = await pool.fetchval(
            "SELECT subject_id FROM intake_record WHERE event_id = $1", letter.event_id
        )
        if recorded is not None:
            return [recorded]
    named = letter.headers.get("ce_subject", "")
    return [named] if _SUBJECT.fullmatch(named) else []


async def show_dead_letter(settings: Settings, pool: asyncpg.Pool, letter_id: str) -> StoredDeadLetter:
    parsed = DeadLetterId.parse(letter_id)
    async with DeadLetterReader(settings) as reader:
        letter = await reader.one(parsed)
    return (await _with_redrives(pool, [letter]))[0]


# --- Redriving them -----------------------------------------------------------------------


class RedriveRefused(ValueError):
    """This dead letter cannot be redriven (and is left where it is), for this reason."""


@dataclass(frozen=True)
class Republish:
    """Publish the stored original on the life-events topic again: the router routes it as new."""


@dataclass(frozen=True)
class Redeliver:
    """Redeliver the stored original to this one agency."""

    agency: str


@dataclass(frozen=True)
class RedriveOutcome:
    id: DeadLetterId
    outcome: str  # redriven | skipped | refused
    detail: str
    event_id: uuid.UUID | None = None


def check_reason(reason: str, requested_by: str) -> tuple[str, str]:
    try:
        reason = checked_reason(reason)
    except NotPlainWords as exc:
        raise RedriveRefused(f"{exc}; it is kept with the redrive") from exc
    try:
        return reason, checked_name(requested_by)
    except NotPlainWords as exc:
        raise RedriveRefused(f"--by names who asks: {exc}") from exc


def plan_redrive(prefix: str, letter: StoredDeadLetter) -> Republish | Redeliver:
    """What redriving ``letter`` means, from where it came; RedriveRefused if nothing can."""
    topics = Topics(prefix)
    if letter.event_id is None:
        raise RedriveRefused(
            "it has no event id (its ce_id header is "
            + ("missing" if letter.claimed_id is None else f"{printable(letter.claimed_id, 40)!r}")
            + "), so it is no event this bus recorded"
        )
    origin = letter.origin_topic
    if letter.id.source != BUS:
        if origin != topics.agency(letter.id.source):
            raise RedriveRefused(
                f"it is on {letter.id.source}'s dead-letter topic but says it came from "
                f"{printable(origin or 'nowhere', 80)}"
            )
        return Redeliver(letter.id.source)
    if origin == topics.life_events:
        return Republish()
    if origin == topics.redeliveries:
        target = letter.headers.get(REDELIVER_TO, "")
        if not _AGENCY.fullmatch(target):
            raise RedriveRefused(f"a redelivery without a valid {REDELIVER_TO} header")
        return Redeliver(target)
    if origin is not None and origin.startswith(topics.receipts("")):
        raise RedriveRefused("it is a receipt: receipts are sent again by the agency, not redriven")
    if origin == topics.routing_decisions:
        raise RedriveRefused("it is a routing decision: the router records decisions, nothing to redrive")
    raise RedriveRefused(f"it came from {printable(origin or 'an unknown topic', 80)}, which is not redriven")


class _Lent:
    """Lends ``redeliver`` (which takes a pool) the connection whose transaction the
    redrive is recorded in, so the redelivery and its record commit together."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        yield self.conn


async def _redrive_one(
    conn: asyncpg.Connection,
    prefix: str,
    letter: StoredDeadLetter,
    *,
    reason: str,
    requested_by: str,
    again: bool,
) -> RedriveOutcome:
    topics = Topics(prefix)
    place = (letter.topic, letter.id.partition, letter.id.offset)
    # Two operators redriving the same dead letter at once: one waits for the other.
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", "dlq:" + ":".join(map(str, place))
    )
    earlier = await conn.fetchrow(
        "SELECT requested_by, requested_at FROM dead_letter_redrive"
        ' WHERE topic = $1 AND partition = $2 AND "offset" = $3 ORDER BY id DESC LIMIT 1',
        *place,
    )
    if earlier is not None and not again:
        return RedriveOutcome(
            letter.id,
            "skipped",
            f"redriven already by {earlier['requested_by']} at {earlier['requested_at']:%Y-%m-%d %H:%M} UTC "
            "(--again to redrive it once more)",
            letter.event_id,
        )
    plan = plan_redrive(prefix, letter)
    event_id = letter.event_id
    assert event_id is not None
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM intake_record WHERE event_id = $1)", event_id):
        raise RedriveRefused(
            f"no event {event_id} was recorded by this bus's intake; there is no original to send"
        )
    if isinstance(plan, Republish):
        routed = await conn.fetchval("SELECT count(*) FROM routing_decision WHERE event_id = $1", event_id)
        if routed:
            raise RedriveRefused(
                f"event {event_id} has been routed since ({routed} routing decisions); to send it to one "
                "agency again use `tuo receipts redeliver`"
            )
        original = await conn.fetchrow(
            "SELECT message_key, message_value, headers FROM outbox WHERE event_id = $1 AND topic = $2"
            " ORDER BY id LIMIT 1",
            event_id,
            topics.life_events,
        )
        if original is None:
            raise RedriveRefused(f"event {event_id} has no stored original on {topics.life_events}")
        [outbox_id] = await outbox.append(
            conn,
            [
                OutboxMessage(
                    event_id,
                    topics.life_events,
                    original["message_key"],
                    original["message_value"],  # sealed, bound to this event id: opened as it is
                    original["headers"],
                )
            ],
        )
        await conn.execute(
            'INSERT INTO dead_letter_redrive (dead_letter, topic, partition, "offset", event_id, action,'
            " outbox_id, requested_by, reason) VALUES ($1, $2, $3, $4, $5, 'republished', $6, $7, $8)",
            str(letter.id),
            *place,
            event_id,
            outbox_id,
            requested_by,
            reason,
        )
        detail = f"event {event_id} published again on {topics.life_events}; the router routes it as new"
    else:
        try:
            async with conn.transaction():  # a savepoint: a refusal undoes only this
                await redeliver(
                    cast(asyncpg.Pool, _Lent(conn)),
                    topics,
                    agency=plan.agency,
                    event_ids=[str(event_id)],
                    requested_by=requested_by,
                    reason=reason,
                )
        except RedeliveryRefused as exc:
            raise RedriveRefused(str(exc)) from exc
        redelivery_id = await conn.fetchval("SELECT currval(pg_get_serial_sequence('redelivery', 'id'))")
        await conn.execute(
            'INSERT INTO dead_letter_redrive (dead_letter, topic, partition, "offset", event_id, action,'
            " agency, redelivery_id, requested_by, reason)"
            " VALUES ($1, $2, $3, $4, $5, 'redelivered', $6, $7, $8, $9)",
            str(letter.id),
            *place,
            event_id,
            plan.agency,
            redelivery_id,
            requested_by,
            reason,
        )
        detail = (
            f"event {event_id} redelivered to {plan.agency}; the router re-checks subscriptions and consent"
        )
    log.info(
        "dead_letter_redriven",
        dead_letter=str(letter.id),
        event_id=str(event_id),
        action="republished" if isinstance(plan, Republish) else "redelivered",
        requested_by=requested_by,
    )
    return RedriveOutcome(letter.id, "redriven", detail, event_id)


async def redrive(
    settings: Settings,
    pool: asyncpg.Pool,
    letter_ids: list[str] | None,
    *,
    reason: str,
    requested_by: str,
    again: bool = False,
    agency: str | None = None,
) -> list[RedriveOutcome]:
    """Redrive the named dead letters (None: every dead letter, or every one on
    ``agency``'s topic; ``bus`` for the shared one), each in its own transaction with
    its record; one that cannot be redriven is left in place and reported. Bad ids or
    a bad reason refuse the whole request before anything is read."""
    reason, requested_by = check_reason(reason, requested_by)
    if letter_ids is not None:
        if not letter_ids:
            raise RedriveRefused("name the dead letters to redrive, or use --all")
        if agency is not None:
            raise RedriveRefused("--agency goes with --all; a dead letter's id names its topic already")
        parsed = list(dict.fromkeys(DeadLetterId.parse(i) for i in letter_ids))
    if agency is not None:
        _check_source(agency)
    async with DeadLetterReader(settings) as reader:
        if letter_ids is None:
            topics = [await reader.topic_of(agency)] if agency else list((await reader.sources()).values())
            letters = await reader.read(topics)
            letters.sort(key=lambda d: (d.dead_lettered_at, d.id))
        else:
            letters = [await reader.one(i) for i in parsed]
    outcomes = []
    for letter in letters:
        try:
            async with pool.acquire() as conn, conn.transaction():
                outcome = await _redrive_one(
                    conn, settings.topic_prefix, letter, reason=reason, requested_by=requested_by, again=again
                )
        except RedriveRefused as exc:
            outcome = RedriveOutcome(letter.id, "refused", str(exc), letter.event_id)
        outcomes.append(outcome)
    return outcomes
