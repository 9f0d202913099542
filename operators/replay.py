"""Replay: send stored life events again to one named agency, decided today.

Operators replay to give a newly onboarded agency the history it is entitled
to, or to recover an agency whose system lost a day. Replaying personal data is
dangerous, so a replay:

- goes only to the one agency named, straight to its topic (``tuo-replay`` may
  write agencies' topics and nothing else);
- is decided on today's subscriptions and consent, read again for every batch,
  through the router's own pipeline (``router.plan``: verify, read in the same
  order, decide) and with the router's own copy of the event
  (``router.messages``): a subject who withdrew consent is not sent, and the
  agency gets only the fields it is entitled to now;
- honours voids and corrections, wherever they lie (the selection may be
  narrower): a voided event is never sent, nor are its corrections; an original
  that is sent is followed at once by every correction recorded of it, in
  recorded order, each limited (by the router's ``agency_copy``) to the
  fields the agency gets of the original now;
- keeps each event's id, so the agency's consumer de-duplicates a repeat;
- is recorded before anything is sent (``replay``: who, why, what it selects)
  and counted as it goes (how many sent, how many withheld and why), with every
  event it sent in ``replay_delivery``;
- is resumable: its position (the last stored event done) is saved with each
  batch's counts once Kafka has acknowledged the batch. A replay stopped between
  an acknowledgement and that save sends the batch again when resumed; the event
  ids make that harmless, and the counts stay exact.

The stored events are the outbox's originals (sealed at rest, opened here), in
the order they were recorded: one subject's events stay in order on the
agency's topic because the key chooses the partition, as the router's does.

An original recorded with its routing facts (``router.facts``: read from the
event as the router reads it, its signature as the office made it, where each
part lies in its bytes) is decided on those facts and its copy spliced from its
bytes: no decode, no signature check, no encode. Anything else (corrections,
voids, events recorded before the facts were kept) is read, verified and
encoded as the router does.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from router import facts as routing_facts
from router.facts import RoutingFacts
from router.messages import FOLLOW_UPS, Incoming, Outgoing, UnroutableEvent, agency_copy, routable
from router.plan import (
    Decidable,
    DecisionInputs,
    decide_on,
    decide_on_follow_up,
    read_inputs,
    verify_signatures,
)
from router.rules import OriginalDelivery, Outcome, RoutingDecision
from router.store import OriginalEvent
from runtime import kafka
from runtime.access import AGENCY_NAME, Principal
from runtime.garbage import fewer_collections
from runtime.kafka import Topics, partition_of
from runtime.keyring import KeyRing
from runtime.pseudonyms import subject_id_for
from runtime.sealing import CannotOpen, PayloadSealer
from runtime.settings import Settings
from schemas.catalogue import LIFE_EVENTS, active
from schemas.validation import is_reference, normalise_nino

log = structlog.get_logger(__name__)

REPLAY_ID_HEADER = "tuo_replay_id"  # lets an agency see a message came from a replay
UNROUTABLE = "UNROUTABLE"  # a stored event the router could not route either (counted, not sent)
VOIDED = "VOIDED"  # a voided event, or a correction of one: never replayed (counted, not sent)
MAX_EVENT_IDS = 10_000
MAX_RATE = 1_000_000
DEFAULT_RATE = 5_000
BATCH_SIZE = 5_000
_SUBJECT_ID = re.compile(r"^[ns]-[0-9a-f]{32}$")


class ReplayRefused(ValueError):
    """The replay cannot start or resume; the message says why and what to do."""


@dataclass(frozen=True)
class Selection:
    """Which stored events a replay covers: every given criterion must hold."""

    since: datetime | None = None  # recorded at or after
    until: datetime | None = None  # recorded before
    subject_id: str | None = None
    event_ids: tuple[str, ...] = ()
    references: tuple[str, ...] = ()
    event_types: tuple[str, ...] = ()
    everything: bool = False  # asked for explicitly: no criterion at all

    @classmethod
    def of(
        cls,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        subject: str | None = None,
        event_ids: Sequence[str] = (),
        references: Sequence[str] = (),
        event_types: Sequence[str] = (),
        everything: bool = False,
        pseudonym_key: Callable[[], bytes] | None = None,
    ) -> Selection:
        """Checked criteria; a subject is a pseudonymous subject id or a NINO."""
        if since and until and since >= until:
            raise ReplayRefused("--since must be earlier than --until")
        for moment in (since, until):
            if moment is not None and moment.tzinfo is None:
                raise ReplayRefused("give times with a time zone, e.g. 2026-11-01T00:00:00Z")
        if len(event_ids) + len(references) > MAX_EVENT_IDS:
            raise ReplayRefused(f"name at most {MAX_EVENT_IDS} events; select a time range instead")
        ids = []
        for event_id in event_ids:
            try:
                ids.append(str(uuid.UUID(event_id.strip())))
            except ValueError:
                raise ReplayRefused(f"{event_id[:50]!r} is not an event id (a UUID)") from None
        refs = [r.strip().upper() for r in references]
        for ref in refs:
            if not is_reference(ref):
                raise ReplayRefused(f"{ref[:50]!r} is not a reference number, like TUO-2026-ABCD-EFGH")
        unknown = sorted(set(event_types) - set(LIFE_EVENTS))
        if unknown:
            raise ReplayRefused(
                f"unknown event type {unknown[0][:50]!r}; choose from {', '.join(sorted(LIFE_EVENTS))}"
            )
        subject_id = None
        if subject is not None:
            subject_id = _subject_id(subject.strip(), pseudonym_key)
        chosen = cls(since, until, subject_id, tuple(ids), tuple(refs), tuple(sorted(set(event_types))))
        if everything and chosen.narrowed:
            raise ReplayRefused("--everything cannot be combined with other criteria")
        if not everything and not chosen.narrowed:
            raise ReplayRefused(
                "say which events: --since/--until, --subject, --event-id, --reference or --event-type; "
                "or --everything to replay every stored event the agency is entitled to"
            )
        return cls(
            chosen.since,
            chosen.until,
            chosen.subject_id,
            chosen.event_ids,
            chosen.references,
            chosen.event_types,
            everything,
        )

    @property
    def narrowed(self) -> bool:
        return bool(
            self.since
            or self.until
            or self.subject_id
            or self.event_ids
            or self.references
            or self.event_types
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "subject_id": self.subject_id,
            "event_ids": list(self.event_ids),
            "references": list(self.references),
            "event_types": list(self.event_types),
            "everything": self.everything,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Selection:
        return cls(
            datetime.fromisoformat(data["since"]) if data["since"] else None,
            datetime.fromisoformat(data["until"]) if data["until"] else None,
            data["subject_id"],
            tuple(data["event_ids"]),
            tuple(data["references"]),
            tuple(data["event_types"]),
            data["everything"],
        )

    def where(self, first: int, o: str = "o", i: str = "i") -> tuple[str, list[Any]]:
        """SQL conditions on an outbox row (alias ``o``) joined with its intake record
        (alias ``i``), and their arguments numbered from ``$first``."""
        clauses: list[str] = []
        args: list[Any] = []

        def add(clause: str, value: Any) -> None:
            args.append(value)
            clauses.append(clause.replace("$?", f"${first + len(args) - 1}"))

        if self.since:
            add(f"{i}.recorded_at >= $?", self.since)
        if self.until:
            add(f"{i}.recorded_at < $?", self.until)
        if self.subject_id:
            add(f"{i}.subject_id = $?", self.subject_id)
        if self.event_ids or self.references:
            ids, refs = list(self.event_ids), list(self.references)
            args += [ids, refs]
            clauses.append(
                f"({o}.event_id = ANY(${first + len(args) - 2}::uuid[])"
                f" OR {i}.reference = ANY(${first + len(args) - 1}::text[]))"
            )
        if self.event_types:
            add(f"{i}.event_type = ANY($?::text[])", list(self.event_types))
        return " AND ".join(clauses) or "true", args


def _subject_id(subject: str, pseudonym_key: Callable[[], bytes] | None) -> str:
    if _SUBJECT_ID.match(subject):
        return subject
    try:
        nino = normalise_nino(subject)
    except ValueError:
        raise ReplayRefused(
            "--subject takes a subject id (like n-0123…) or a National Insurance number"
        ) from None
    if pseudonym_key is None:
        raise ReplayRefused("a NINO needs the pseudonym key (TUO_PSEUDONYM_KEY) to find its subject")
    return subject_id_for(nino, pseudonym_key())


@dataclass
class Tally:
    """What a replay has done so far."""

    selected: int
    examined: int = 0  # selected stored events decided: sent + withheld
    sent: int = 0  # selected stored events sent
    withheld: Counter[str] = field(default_factory=Counter)  # selected, not sent: outcome → count
    # Corrections outside the selection sent right after their originals (not in ``sent``).
    corrections_sent: int = 0

    @property
    def withheld_total(self) -> int:
        return sum(self.withheld.values())


@dataclass(frozen=True)
class Replay:
    id: str
    agency: str
    selection: Selection
    reason: str
    requested_by: str
    dry_run: bool
    rate: int
    upto: int
    position: int
    tally: Tally
    status: str

    @classmethod
    def of(cls, row: asyncpg.Record) -> Replay:
        return cls(
            id=str(row["id"]),
            agency=row["agency"],
            selection=Selection.from_json(json.loads(row["selection"])),
            reason=row["reason"],
            requested_by=row["requested_by"],
            dry_run=row["dry_run"],
            rate=row["rate_limit"],
            upto=row["upto"],
            position=row["position"],
            tally=Tally(
                selected=row["selected"],
                examined=row["examined"],
                sent=row["sent"],
                withheld=Counter(json.loads(row["withheld"])),
                corrections_sent=row["corrections_sent"],
            ),
            status=row["status"],
        )


def _storable(o: str = "o") -> str:
    """An outbox row (alias ``o``) a replay may cover: on life events ($1), published, up
    to the replay's high-water mark ($3), and the event's first row (its original;
    later ones, from a redrive, are copies)."""
    return (
        f"{o}.topic = $1 AND {o}.published_at IS NOT NULL AND {o}.id <= $3"
        f" AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.event_id = {o}.event_id"
        f" AND e.topic = {o}.topic AND e.id < {o}.id)"
    )


_STORED = f"FROM outbox o JOIN intake_record i USING (event_id) WHERE {_storable()} AND o.id > $2"


async def start(
    pool: asyncpg.Pool,
    settings: Settings,
    *,
    agency: str,
    selection: Selection,
    reason: str,
    requested_by: str,
    dry_run: bool = False,
    rate: int = DEFAULT_RATE,
) -> Replay:
    """Check the request and record the replay; nothing is sent yet."""
    reason = reason.strip()
    requested_by = requested_by.strip()
    if not AGENCY_NAME.match(agency):
        raise ReplayRefused(f"{agency[:50]!r} is not an agency code (like hmrc)")
    if not 3 <= len(reason) <= 500:
        raise ReplayRefused("give a --reason of 3 to 500 characters; it is kept with the replay")
    if not 1 <= len(requested_by) <= 100:
        raise ReplayRefused("say who asks for the replay in 1 to 100 characters (--by)")
    if not 1 <= rate <= MAX_RATE:
        raise ReplayRefused(f"--rate must be between 1 and {MAX_RATE} events a second")
    topics = Topics(settings.topic_prefix)
    async with pool.acquire() as conn, conn.transaction():
        account = await conn.fetchrow("SELECT status FROM agency_account WHERE agency = $1", agency)
        subscribed = await conn.fetchval("SELECT count(*) FROM subscription WHERE agency = $1", agency)
        if account is None and not subscribed:
            raise ReplayRefused(f"no agency {agency!r} is onboarded; see `tuo agencies list`")
        if account is not None and account["status"] == "suspended":
            raise ReplayRefused(f"{agency} is suspended; reinstate it before replaying to it")
        upto = await conn.fetchval("SELECT coalesce(max(id), 0) FROM outbox")
        where, args = selection.where(4)
        selected = await conn.fetchval(
            f"SELECT count(*) {_STORED} AND {where}", topics.life_events, 0, upto, *args
        )
        row = await conn.fetchrow(
            "INSERT INTO replay"
            " (id, agency, selection, reason, requested_by, dry_run, rate_limit, upto, selected)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING *",
            uuid.uuid4(),
            agency,
            json.dumps(selection.as_json()),
            reason,
            requested_by,
            dry_run,
            rate,
            upto,
            selected,
        )
    replay = Replay.of(row)
    log.info(
        "replay_recorded",
        replay_id=replay.id,
        agency=agency,
        dry_run=dry_run,
        selected=selected,
        requested_by=requested_by,
    )
    return replay


async def find(pool: asyncpg.Pool, replay_id: str) -> Replay:
    try:
        key = uuid.UUID(replay_id.strip())
    except ValueError:
        raise ReplayRefused(
            f"{replay_id[:50]!r} is not a replay id (a UUID, as `tuo replay list` shows)"
        ) from None
    row = await pool.fetchrow("SELECT * FROM replay WHERE id = $1", key)
    if row is None:
        raise ReplayRefused(f"no replay {key}; see `tuo replay list`")
    return Replay.of(row)


async def recent(pool: asyncpg.Pool, limit: int = 20) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT * FROM replay ORDER BY started_at DESC LIMIT $1", limit
    )
    return rows


@dataclass
class _Batch:
    position: int
    copies: list[Outgoing]
    # event id, agency, basis, fields, subscription version
    delivered: list[tuple[uuid.UUID, str, str, list[str], int | None]]
    sent: int  # selected events among ``delivered``
    corrections_sent: int  # corrections outside the selection among ``delivered``
    withheld: Counter[str]

    @property
    def examined(self) -> int:
        return self.sent + sum(self.withheld.values())


@dataclass(frozen=True)
class _Stored:
    """A stored event as this batch decides on it: its row, and the event when it can be
    read and its office's signature verifies (``None``: not routable), as the router
    reads it or as its routing facts keep it (with its bytes, to splice copies from)."""

    event_id: str
    uuid: uuid.UUID  # the same, as the database gives it (made once, not per copy)
    selected: bool  # in the replay's selection (counted), or brought along (a later correction)
    incoming: Incoming | RoutingFacts | None
    value: bytes = b""  # the event's bytes, for routing facts


class Replayer:
    """Runs one recorded replay to its end (or until ``stop`` is set)."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, replay: Replay, batch_size: int = BATCH_SIZE):
        self.settings = settings
        self.pool = pool
        self.replay = replay
        self.topics = Topics(settings.topic_prefix)
        self.topic = self.topics.agency(replay.agency)
        self.batch_size = max(1, min(batch_size, replay.rate))
        self.sealer = PayloadSealer.from_settings(settings)
        self.schema_base_url = settings.schema_base_url()
        self.replay_header = (REPLAY_ID_HEADER, replay.id.encode())
        # The offices' keys: every event without routing facts is verified, as the router does.
        self.keys = KeyRing.from_database(pool)
        self.dataschemas: dict[str, str] = {}  # event type → its copies' ce_dataschema
        self.facts_used = 0  # events decided on their routing facts (the rest: read and verified)

    async def run(
        self, on_progress: Callable[[Tally], None] | None = None, stop: asyncio.Event | None = None
    ) -> Replay:
        if self.pool.get_max_size() < 2:
            raise ReplayRefused("replay needs a database pool of at least 2 (TUO_DATABASE_POOL_SIZE)")
        async with self.pool.acquire() as guard:
            # One runner per replay: a second `--resume` while the first still runs is refused.
            if not await guard.fetchval(
                "SELECT pg_try_advisory_lock(hashtextextended($1, 7))", self.replay.id
            ):
                raise ReplayRefused(f"replay {self.replay.id} is running elsewhere")
            try:
                self.replay = await find(self.pool, self.replay.id)  # as it is now, under the lock
                if self.replay.status == "finished":
                    raise ReplayRefused(
                        f"replay {self.replay.id} has finished; start a new one to send again"
                    )
                await _refuse_if_suspended(guard, self.replay.agency)
                with fewer_collections():
                    await self._run(on_progress, stop)
            finally:
                await guard.execute("SELECT pg_advisory_unlock(hashtextextended($1, 7))", self.replay.id)
        return await find(self.pool, self.replay.id)

    async def _run(self, on_progress: Callable[[Tally], None] | None, stop: asyncio.Event | None) -> None:
        replay = self.replay
        tally = Tally(
            replay.tally.selected, replay.tally.examined, replay.tally.sent, Counter(replay.tally.withheld)
        )
        await self.pool.execute(
            "UPDATE replay SET attempts = attempts + 1 WHERE id = $1", uuid.UUID(replay.id)
        )
        log.info("replay_started", replay_id=replay.id, agency=replay.agency, position=replay.position)
        producer = None if replay.dry_run else await self._producer()
        pending: asyncio.Future[list[asyncpg.Record]] | None = None
        try:
            position, started, sent_here = replay.position, time.monotonic(), 0
            pending = asyncio.ensure_future(self._fetch(position))
            while True:
                rows = await pending
                if not rows:
                    break
                position = rows[-1]["id"]
                pending = asyncio.ensure_future(self._fetch(position))  # the next batch, meanwhile
                batch = await self._decide(rows)
                if producer is not None:
                    await self._send(producer, batch.copies)
                await self._save(batch)
                tally.examined += batch.examined
                tally.sent += batch.sent
                tally.corrections_sent += batch.corrections_sent
                tally.withheld.update(batch.withheld)
                sent_here += batch.examined + batch.corrections_sent
                if on_progress is not None:
                    on_progress(tally)
                if stop is not None and stop.is_set():
                    log.info("replay_paused", replay_id=replay.id, examined=tally.examined)
                    return
                # The rate limit: no faster than ``rate`` stored events a second, on average.
                ahead = sent_here / replay.rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            await self.pool.execute(
                "UPDATE replay SET status = 'finished', finished_at = clock_timestamp() WHERE id = $1",
                uuid.UUID(replay.id),
            )
            log.info(
                "replay_finished",
                replay_id=replay.id,
                agency=replay.agency,
                sent=tally.sent,
                withheld=dict(tally.withheld),
                dry_run=replay.dry_run,
                read_from_routing_facts=self.facts_used,
            )
        finally:
            if pending is not None:  # a fetch started ahead is not wanted after a stop or failure
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
            if producer is not None:
                await producer.stop()

    async def _producer(self) -> AIOKafkaProducer:
        producer = kafka.producer(
            self.settings,
            principal=Principal.REPLAY,
            client_id="tuo-replay",
            role="replay",
        )
        await producer.start()
        try:
            self.partitions = len(await asyncio.wait_for(producer.partitions_for(self.topic), timeout=15))
        except Exception as exc:
            await producer.stop()
            raise ReplayRefused(
                f"cannot send to {self.topic} ({type(exc).__name__}); is {self.replay.agency} onboarded "
                "(`tuo agencies add`) and may tuo-replay write its topic (`tuo access grant`)?"
            ) from exc
        return producer

    async def _fetch(self, after: int) -> list[asyncpg.Record]:
        replay = self.replay
        where, args = replay.selection.where(5)
        with_original, original_args = replay.selection.where(5 + len(args), o="fo", i="fi")
        rows: list[asyncpg.Record] = await self.pool.fetch(
            "SELECT o.id, o.event_id, o.message_key, o.message_value, o.headers, o.routing_facts,"
            "  i.event_type,"
            # A correction whose original is selected too is decided with that original.
            "  CASE WHEN i.event_type = 'EventCorrected' THEN EXISTS ("
            "    SELECT 1 FROM outbox fo JOIN intake_record fi USING (event_id)"
            f"    WHERE fo.event_id = i.follows_event_id AND {_storable('fo')} AND {with_original})"
            "  ELSE false END AS with_original"
            f" {_STORED} AND {where} ORDER BY o.id LIMIT $4",
            self.topics.life_events,
            after,
            replay.upto,
            self.batch_size,
            *args,
            *original_args,
        )
        return rows

    async def _corrections(
        self, conn: asyncpg.Connection, original_ids: list[uuid.UUID]
    ) -> list[asyncpg.Record]:
        """Every correction recorded so far of these originals, in recorded order, each
        saying whether it is in the selection. Corrections recorded after the replay began,
        or unpublished yet, are included: an original never goes without its known fixes."""
        if not original_ids:
            return []
        where, args = self.replay.selection.where(4)
        rows: list[asyncpg.Record] = await conn.fetch(
            "SELECT o.id, o.event_id, o.message_key, o.message_value, o.headers, NULL AS routing_facts,"
            "  i.follows_event_id::text AS original, ("
            f"{_storable()} AND {where}) AS selected"
            "  FROM outbox o JOIN intake_record i USING (event_id)"
            " WHERE i.follows_event_id = ANY($2::uuid[]) AND i.event_type = 'EventCorrected'"
            "   AND o.topic = $1 AND NOT EXISTS (SELECT 1 FROM outbox e"
            "     WHERE e.event_id = o.event_id AND e.topic = o.topic AND e.id < o.id)"
            " ORDER BY o.id",
            self.topics.life_events,
            original_ids,
            self.replay.upto,
            *args,
        )
        return rows

    def _stored(self, row: asyncpg.Record, selected: bool) -> _Stored:
        """The stored event as its routing facts keep it, or else as the router reads it."""
        event_id = str(row["event_id"])
        if row["routing_facts"] is not None:
            try:
                kept = routing_facts.opened(self.sealer, row["event_id"], row["routing_facts"])
            except (CannotOpen, ValueError, KeyError, TypeError) as exc:
                # Read the router's way instead, which verifies the office's signature.
                log.warning("replay_routing_facts_unread", event_id=event_id, error=type(exc).__name__)
            else:
                event_type = kept.event.event_type
                if (
                    kept.event.event_id == event_id
                    and kept.spans.schema_id == active().latest(event_type).schema_id
                ):
                    self.facts_used += 1
                    return _Stored(
                        event_id,
                        row["event_id"],
                        selected,
                        kept,
                        self._open(row["message_value"], row["event_id"]),
                    )
        return _Stored(event_id, row["event_id"], selected, self._read(row))

    def _read(self, row: asyncpg.Record) -> Incoming | None:
        """The stored event as the router reads it, or ``None`` when the router could not
        route it either (it dead-lettered it; `tuo dlq` has it)."""
        record = ConsumerRecord(
            topic=self.topics.life_events,
            partition=-1,
            offset=row["id"],
            timestamp=0,
            timestamp_type=0,
            key=row["message_key"],
            value=self._open(row["message_value"], row["event_id"]),
            checksum=None,
            serialized_key_size=-1,
            serialized_value_size=-1,
            headers=[(k, v.encode()) for k, v in json.loads(row["headers"])],
        )
        try:
            return routable(record)
        except UnroutableEvent:
            return None

    async def _verified(self, stored: list[_Stored]) -> list[_Stored]:
        """As the router does: an event whose office signature fails is not sent now. (An
        event decided on its routing facts was read from what intake signed itself.)"""
        read = [s.incoming for s in stored if isinstance(s.incoming, Incoming)]
        failures = iter(await verify_signatures(self.keys, read))
        checked = []
        for item in stored:
            if isinstance(item.incoming, Incoming) and next(failures) is not None:
                item = _Stored(item.event_id, item.uuid, item.selected, None)
            checked.append(item)
        return checked

    async def _decide(self, rows: list[asyncpg.Record]) -> _Batch:
        """Today's decision for the named agency on each stored event of the batch.

        A voided event is never sent, nor its corrections. An original that is sent is
        followed at once by every correction recorded of it, selected or not, each limited
        to the fields the agency gets of the original today; a selected correction of a
        selected original shares that original's outcome."""
        agency = self.replay.agency
        # A correction decided with its selected original is not decided again here.
        own = [r for r in rows if not r["with_original"]]
        originals_here = [r["event_id"] for r in own if r["event_type"] not in FOLLOW_UPS]
        async with self.pool.acquire() as conn:
            correction_rows = await self._corrections(conn, originals_here)
        stored = await self._verified(
            [self._stored(r, True) for r in own] + [self._stored(r, r["selected"]) for r in correction_rows]
        )
        mine, fixes = stored[: len(own)], stored[len(own) :]
        corrections: dict[str, list[_Stored]] = {}
        for row, fix in zip(correction_rows, fixes, strict=True):
            corrections.setdefault(row["original"], []).append(fix)
        incoming = [s.incoming for s in mine if s.incoming is not None]
        follows = [i.follows[0] for i in incoming if i.follows]
        async with self.pool.acquire() as conn:
            # Read now, for this batch, as the router reads (router.plan says why in that
            # order): a withdrawal confirmed before this read stops delivery. The agency's
            # own subscriptions are all its decision depends on.
            inputs = await read_inputs(
                conn, incoming, lambda c, ids: _originals(c, ids, agency), agency=agency
            )
            voided = await _voided(conn, [*(str(i) for i in originals_here), *follows])
        batch = _Batch(rows[-1]["id"], [], [], 0, 0, Counter())

        def send(item: _Stored, decision: RoutingDecision, selected: bool) -> None:
            batch.copies.append(self._copy(item, decision))
            batch.delivered.append(
                (
                    item.uuid,
                    agency,
                    decision.legal_basis or "",
                    sorted(decision.fields_delivered),
                    decision.subscription_version,
                )
            )
            if selected:
                batch.sent += 1
            else:
                batch.corrections_sent += 1

        for entry in mine:
            item = entry.incoming
            fixes_of = corrections.get(entry.event_id, [])
            if item is None:
                # Not routable: its selected corrections are not sent without it either.
                batch.withheld[UNROUTABLE] += 1 + sum(f.selected for f in fixes_of)
                continue
            event = item.event
            if item.follows is None:
                if event.event_id in voided:
                    batch.withheld[VOIDED] += 1 + sum(f.selected for f in fixes_of)
                    continue
                decision = next((d for d in decide_on(item, inputs) if d.agency == agency), None)
                if decision is None or not decision.delivers:
                    outcome = decision.outcome.value if decision else Outcome.WITHHELD_NO_SUBSCRIPTION.value
                    batch.withheld[outcome] += 1 + sum(f.selected for f in fixes_of)
                    continue
                send(entry, decision, selected=True)
                # Its corrections, in recorded order, right behind it on the same partition.
                sent_now = [
                    OriginalDelivery(
                        agency, decision.legal_basis, decision.fields_delivered, decision.subscription_version
                    )
                ]
                for fix in fixes_of:
                    if fix.incoming is None:
                        outcome = UNROUTABLE
                    else:
                        follow_up = self._follow_up(
                            fix.incoming, OriginalEvent(event.event_type, sent_now), inputs
                        )
                        if follow_up.delivers:
                            send(fix, follow_up, fix.selected)
                            continue
                        outcome = follow_up.outcome.value
                    if fix.selected:
                        batch.withheld[outcome] += 1
                    else:  # not selected, so not counted; the operator may want to know
                        log.warning(
                            "replay_correction_not_sent",
                            replay_id=self.replay.id,
                            event_id=fix.event_id,
                            outcome=outcome,
                        )
                continue
            # A void, or a correction whose original is not selected: it goes only where
            # the original is already held, and a correction of a voided event never goes.
            original = inputs.originals.get(item.follows[0])
            if original is None or original.event_type != item.follows[1]:
                batch.withheld[UNROUTABLE] += 1
                continue
            if event.event_type == "EventCorrected" and item.follows[0] in voided:
                batch.withheld[VOIDED] += 1
                continue
            if not any(
                s.event_type == original.event_type and s.in_force(inputs.now) for s in inputs.subscriptions
            ):
                # No longer subscribed to what it corrects: today's subscriptions decide.
                batch.withheld[Outcome.WITHHELD_NO_SUBSCRIPTION.value] += 1
                continue
            follow_up = self._follow_up(item, original, inputs)
            if not follow_up.delivers:
                batch.withheld[follow_up.outcome.value] += 1
                continue
            send(entry, follow_up, selected=True)
        return batch

    def _follow_up(self, item: Decidable, original: OriginalEvent, inputs: DecisionInputs) -> RoutingDecision:
        """The router's decision on a correction or void for this agency: it goes only
        where the original is held, within the fields the agency got of it."""
        # One agency asked about, so one decision.
        (decision,) = decide_on_follow_up(item, original, [self.replay.agency], inputs)
        return decision

    def _open(self, sealed: bytes, event_id: uuid.UUID) -> bytes:
        try:
            return self.sealer.open(sealed, event_id)
        except CannotOpen as exc:
            raise ReplayRefused(
                f"{exc}; if the data key was rotated, give the earlier key in TUO_DATA_KEYS_PREVIOUS"
            ) from exc

    def _copy(self, stored: _Stored, decision: RoutingDecision) -> Outgoing:
        item = stored.incoming
        if isinstance(item, RoutingFacts):
            event_type = item.event.event_type
            dataschema = self.dataschemas.get(event_type)
            if dataschema is None:
                dataschema = self.dataschemas[event_type] = routing_facts.dataschema(
                    self.schema_base_url, event_type
                )
            return item.copy(self.topic, stored.value, decision, dataschema, [self.replay_header])
        assert item is not None  # only a routable event is sent
        copy = agency_copy(self.topics, item, decision, self.schema_base_url)
        return Outgoing(copy.topic, copy.key, copy.value, [*copy.headers, self.replay_header])

    async def _send(self, producer: AIOKafkaProducer, copies: list[Outgoing]) -> None:
        """The batch, in whole Kafka record batches per partition; returns once every
        message is acknowledged by the in-sync replicas (acks=all)."""
        builders: dict[int, Any] = {}
        sent: list[asyncio.Future[Any]] = []
        for copy in copies:
            partition = 0 if copy.key is None else partition_of(copy.key, self.partitions)
            builder = builders.get(partition)
            if builder is None:
                builder = builders[partition] = producer.create_batch()
            if builder.append(key=copy.key, value=copy.value, timestamp=None, headers=copy.headers) is None:
                sent.append(await producer.send_batch(builder, self.topic, partition=partition))
                builder = builders[partition] = producer.create_batch()
                if (
                    builder.append(key=copy.key, value=copy.value, timestamp=None, headers=copy.headers)
                    is None
                ):
                    event_id = next((v.decode() for k, v in copy.headers if k == "ce_id"), "?")
                    raise ReplayRefused(f"event {event_id} is too large for one Kafka batch")
        for partition, builder in builders.items():
            if builder.record_count():
                sent.append(await producer.send_batch(builder, self.topic, partition=partition))
        await asyncio.gather(*sent)

    async def _save(self, batch: _Batch) -> None:
        """The batch's counts and position, and what it sent, in one transaction."""
        replay_id = uuid.UUID(self.replay.id)
        async with self.pool.acquire() as conn, conn.transaction():
            if batch.delivered and not self.replay.dry_run:
                sent_at = await conn.fetchval("SELECT clock_timestamp()")
                await conn.copy_records_to_table(
                    "replay_delivery",
                    records=[(replay_id, e, a, b, f, sent_at, v) for e, a, b, f, v in batch.delivered],
                    columns=[
                        "replay_id",
                        "event_id",
                        "agency",
                        "legal_basis",
                        "fields_delivered",
                        "sent_at",
                        "subscription_version",
                    ],
                )
            await conn.execute(
                "UPDATE replay SET position = $2, examined = examined + $3, sent = sent + $4,"
                " corrections_sent = corrections_sent + $6,"
                " withheld = (SELECT coalesce(jsonb_object_agg(k, v), '{}'::jsonb) FROM ("
                "   SELECT k, sum(v)::bigint AS v FROM ("
                "     SELECT key AS k, value::bigint AS v FROM jsonb_each_text(withheld)"
                "     UNION ALL SELECT key, value::bigint FROM jsonb_each_text($5::jsonb)) AS both_counts"
                "   GROUP BY k) AS summed)"
                " WHERE id = $1",
                replay_id,
                batch.position,
                batch.examined,
                batch.sent,
                json.dumps(dict(batch.withheld)),
                batch.corrections_sent,
            )


async def _refuse_if_suspended(conn: asyncpg.Connection, agency: str) -> None:
    if await conn.fetchval("SELECT status FROM agency_account WHERE agency = $1", agency) == "suspended":
        raise ReplayRefused(f"{agency} is suspended; reinstate it before replaying to it")


async def _voided(conn: asyncpg.Connection, event_ids: list[str]) -> set[str]:
    """Those of these events that have been voided: an EventVoided is on the outbox for
    them, whether or not it lies in the replay's selection or was published yet."""
    if not event_ids:
        return set()
    rows = await conn.fetch(
        "SELECT DISTINCT v.follows_event_id::text AS voided"
        "  FROM intake_record v JOIN outbox o USING (event_id)"
        " WHERE v.follows_event_id = ANY($1::uuid[]) AND v.event_type = 'EventVoided'",
        event_ids,
    )
    return {r["voided"] for r in rows}


async def _originals(conn: asyncpg.Connection, event_ids: list[str], agency: str) -> dict[str, OriginalEvent]:
    """For corrections and voids: each original's recorded type, and how it reached the
    agency, by the router or by any replay (none when it did not)."""
    if not event_ids:
        return {}
    rows = await conn.fetch(
        "SELECT i.event_id::text AS event_id, i.event_type, d.legal_basis, d.fields_delivered,"
        "       d.subscription_version"
        "  FROM intake_record i LEFT JOIN LATERAL ("
        # The router's delivery if there was one, else the earliest replay's.
        "    SELECT 0 AS source, legal_basis, fields_delivered, decided_at AS at, subscription_version"
        "      FROM routing_decision"
        "     WHERE event_id = i.event_id AND agency = $2 AND outcome = 'DELIVERED'"
        "    UNION ALL"
        "    SELECT 1, legal_basis, fields_delivered, sent_at, subscription_version FROM replay_delivery"
        "     WHERE event_id = i.event_id AND agency = $2"
        "    ORDER BY source, at LIMIT 1) d ON true"
        " WHERE i.event_id = ANY($1::uuid[])",
        event_ids,
        agency,
    )
    found: dict[str, OriginalEvent] = {}
    for r in rows:
        deliveries = (
            [
                OriginalDelivery(
                    agency, r["legal_basis"], frozenset(r["fields_delivered"]), r["subscription_version"]
                )
            ]
            if r["fields_delivered"] is not None
            else []
        )
        found[r["event_id"]] = OriginalEvent(r["event_type"], deliveries)
    return found
