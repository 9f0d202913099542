"""Accepting an event: the one path every channel (JSON API, HTML forms) takes.

A submission, correction or void is checked, given a reference number and an
envelope, encoded against the contract, signed with the office's key, and
stored with its outbox row in one transaction. Nothing is written unless the
whole request is valid.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import secrets
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

import asyncpg
import structlog
from pydantic import Field, TypeAdapter, ValidationError

from producers.accounts import TOKENS_CHANNEL, AccountError, Submitter, TokenCache, ensure_office
from producers.duplicates import DuplicateRegistration, NothingToOverride, registration_claims
from producers.group_commit import GroupCommit
from producers.office_keys import OFFICE_KEYS_CHANNEL, ActiveKeys, SigningKey
from producers.requests import ConsentChoice, DuplicateOverride, Strict, Submission
from producers.store import (
    SUBSCRIPTIONS_CHANNEL,
    ConsentReceipts,
    EndOfConsent,
    NewEvent,
    Override,
    Recorded,
    StaleSigningKey,
    SubjectLink,
    SubjectMovedMeanwhile,
    consent_agencies,
    earlier_submission,
    latest_link,
)
from router import facts as routing_facts
from router.consent_changes import announce
from router.registrations import (
    ONLINE_OFFICE,
    PERSON_REGISTERED,
    SERVICE_DETAILS,
    SERVICES_REQUESTED,
    RequestRefused,
    as_corrected,
    patch,
    request_problems,
    services,
    services_requested_fields,
)
from router.rules import SUBJECT_ADDRESSES
from router.store import StoredEvent, original_event
from runtime.kafka import Topics
from runtime.local_authorities import local_authority
from runtime.metrics import EVENTS_ACCEPTED
from runtime.notices import NoticedCache, Notices
from runtime.pseudonyms import subject_id_for
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from schemas import decode, encode, models
from schemas.cloudevents import headers_for
from schemas.consent_signatures import ConsentSigner
from schemas.derived import DERIVED_FIELDS, derive
from schemas.fieldpaths import NINO
from schemas.signatures import value_signature_headers
from schemas.validation import REFERENCE_ALPHABET, Nino, PastDate, Postcode, Text, Uprn

log = structlog.get_logger(__name__)


def new_reference(now: datetime) -> str:
    chars = "".join(secrets.choice(REFERENCE_ALPHABET) for _ in range(8))
    return f"TUO-{now:%Y}-{chars[:4]}-{chars[4:]}"


class SubmissionRejected(Exception):
    """The request is not valid; ``errors`` names each bad field."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))
        self.errors = errors


class NotPermitted(Exception):
    """The submitter's role or office does not allow this."""


class NoSuchEvent(LookupError):
    """No event with that reference was recorded by the submitter's office."""


class Change(Strict):
    field: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[a-z_][a-z0-9_]*(\.([a-z_][a-z0-9_]*|[0-9]{1,2}))*$",
        description="Dotted path into the original event, for example `deceased.date_of_birth`;"
        " `nino` is the subject's own National Insurance number.",
    )
    value: Any = Field(description="The corrected value (JSON); null clears an optional field.")


class CorrectionRequest(Strict):
    changes: list[Change] = Field(min_length=1, max_length=20)
    reason: Text


class VoidRequest(Strict):
    reason: Text


# Corrected values obey the same rules as the fields they replace.
_LEAF_RULES: dict[str, TypeAdapter[Any]] = {
    "nino": TypeAdapter(Nino | None),
    "postcode": TypeAdapter(Postcode),
    "uprn": TypeAdapter(Uprn | None),
    "date_of_birth": TypeAdapter(PastDate | None),
    "date_of_death": TypeAdapter(PastDate),
    "effective_date": TypeAdapter(PastDate),
}
_TEXT = TypeAdapter(Text)
# The envelope, and the derived facts (schemas/derived.py), which follow the fields they
# come from and are never corrected on their own.
_UNCORRECTABLE = ("envelope", *(name for names in DERIVED_FIELDS.values() for name in names))
# Looked up from the postcode by intake, so corrected with it, never on its own.
_DERIVED = ("local_authority",)
REGISTRATIONS = ("BirthRegistered", "DeathRegistered", "AddressChanged")


# The consent service's signing key, read on intake's connection (router.consent_receipts
# .consent_signer_within, handed in by the app: producers do not import citizens).
ConsentSignerSource = Callable[[asyncpg.Connection, Settings], Awaitable[ConsentSigner]]


@dataclass(frozen=True)
class Intake:
    """What accepting needs: settings, the database, topic names and the pseudonym key;
    with ``consent_signer``, an informant's refusal that ends a consent given before is
    passed on to the agencies holding data under it (``router.consent_changes``)."""

    settings: Settings
    pool: asyncpg.Pool
    receipts: ConsentReceipts | None = None  # signs a receipt for each consent given at the desk
    consent_signer: ConsentSignerSource | None = None

    @property
    def topics(self) -> Topics:
        return Topics(self.settings.topic_prefix)

    @functools.cached_property  # once per app, not per event (works on a frozen dataclass)
    def sealer(self) -> PayloadSealer:
        return PayloadSealer.from_settings(self.settings)

    @functools.cached_property
    def notices(self) -> Notices:
        """What the caches below listen on (``listen`` at the app's start-up, ``close`` at
        its end); without it they ask the database every time."""
        return Notices(self.pool, (TOKENS_CHANNEL, SUBSCRIPTIONS_CHANNEL, OFFICE_KEYS_CHANNEL))

    @functools.cached_property
    def tokens(self) -> TokenCache:
        return TokenCache(self.pool, self.notices)

    @functools.cached_property
    def signing_keys(self) -> ActiveKeys:
        return ActiveKeys(self.pool, self.sealer, self.notices)

    @functools.cached_property
    def group_commit(self) -> GroupCommit:
        """Registrations arriving together share one transaction (``close`` at the app's end)."""
        return GroupCommit(self.pool, self.receipts)

    @functools.cached_property
    def consent_agencies(self) -> NoticedCache[str, frozenset[str]]:
        """Agencies an informant may give consent to, by event type."""
        return self.notices.cache(SUBSCRIPTIONS_CHANNEL, functools.partial(consent_agencies, self.pool))

    async def accept(
        self,
        submission: Submission,
        submitter: Submitter,
        idempotency_key: str | None,
        channel: Literal["desk", "phone", "online", "system"] | None = None,
    ) -> Recorded:
        """Record a birth, death or change of address; a death or birth already
        registered is refused (``DuplicateRegistration``) unless a supervisor overrides."""
        override = getattr(submission, "duplicate_override", None)
        assert override is None or isinstance(override, DuplicateOverride)
        if override is not None and not submitter.may_override_duplicates:
            raise NotPermitted("only a supervisor may record a registration that duplicates an existing one")
        if submission.registration_office not in (None, submitter.office):
            raise SubmissionRejected(
                [{"field": "registration_office", "message": "is not the office your credentials are for"}]
            )
        allowed = await self.consent_agencies.get(submission.event_type) or frozenset()
        errors = [
            {
                "field": f"consents.{i}.agency",
                "message": f"{c.agency} does not receive {submission.event_type} on consent",
            }
            for i, c in enumerate(submission.consents)
            if c.agency not in allowed
        ]
        if errors:
            raise SubmissionRejected(errors)
        person = submission.subject()
        key = self.settings.require_pseudonym_key()
        subject = subject_id_for(person.nino, key)
        try:
            recorded = await self._record(
                event_type=submission.event_type,
                submitter=submitter,
                idempotency_key=idempotency_key,
                # Without an override the fingerprint is as it was before overrides existed,
                # so that a retry across an upgrade still finds its first submission.
                fingerprint_of=submission.model_dump(
                    mode="json", exclude={"duplicate_override"} if override is None else None
                ),
                subject=models.SubjectIdentifiers(subject_id=subject, nino=person.nino),
                occurred_at=submission.occurred_at(),
                informant=models.Informant(**submission.informant.model_dump()),
                channel=channel or submission.channel,
                body=lambda envelope: submission.contract(envelope).avro(),
                consents=submission.consents,
                claims=tuple(registration_claims(submission, subject, key)),
                override=None if override is None else Override(override.existing_reference, override.reason),
            )
        except DuplicateRegistration as exc:
            log.info(
                "registration_refused_as_duplicate",
                event_type=submission.event_type,
                existing_reference=exc.existing_reference,
                office=submitter.office,
            )
            raise
        except NothingToOverride as exc:
            duplicated = (
                f"it duplicates {', '.join(exc.duplicated)}"
                if exc.duplicated
                else "it duplicates no current registration; send it without duplicate_override"
            )
            raise SubmissionRejected(
                [
                    {
                        "field": "duplicate_override.existing_reference",
                        "message": f"is not a registration this one duplicates ({duplicated})",
                    }
                ]
            ) from None
        if override is not None and recorded.created:  # the reason is free text: kept, not logged
            log.info(
                "duplicate_registration_overridden",
                event_id=str(recorded.event_id),
                existing_reference=override.existing_reference,
                recorded_by=submitter.recorded_by,
            )
        return recorded

    async def correct(
        self, reference: str, request: CorrectionRequest, submitter: Submitter, idempotency_key: str | None
    ) -> Recorded:
        if idempotency_key is not None:
            # A retried request gets its first answer before any check: once a NINO
            # correction is recorded, checking it again would find the NINO unchanged.
            earlier = await earlier_submission(
                self.pool,
                f"{submitter.office}:{idempotency_key}",
                _fingerprint(
                    "EventCorrected",
                    submitter.office,
                    {"original": reference, **request.model_dump(mode="json")},
                ),
            )
            if earlier is not None:
                return earlier
        original = await self._original(reference, submitter)
        patched = json.loads(json.dumps(original.body, default=str))
        patched["envelope"]["subject"]["nino"] = original.nino  # as earlier corrections left it
        errors: list[dict[str, str]] = []
        changes = []
        link: SubjectLink | None = None
        for i, change in enumerate(request.changes):
            try:
                value = _checked_value(change.field, change.value)
                if change.field == NINO:
                    link = self._new_subject(original, value, link)
                    patched["envelope"]["subject"]["nino"] = value
                else:
                    patch(patched, change.field, value)
            except (ValueError, ValidationError) as exc:
                errors.append({"field": f"changes.{i}", "message": _message(exc)})
                continue
            changes.append(models.FieldChange(field=change.field, new_value_json=json.dumps(value)))
        if not errors:
            # A corrected postcode may be in another council's area: every address's authority
            # is looked up again (whatever a replaced address said), and a change is a change.
            for path, authority in _relocated(patched, original.body):
                changes.append(models.FieldChange(field=path, new_value_json=json.dumps(authority)))
            for name, value in _rederived(original.event_type, patched, original.body):
                changes.append(models.FieldChange(field=name, new_value_json=json.dumps(value)))
            try:
                models.TOP_LEVEL_MODELS[original.event_type].model_validate(patched)
            except ValidationError as exc:
                errors.append(
                    {"field": "changes", "message": f"the corrected event is not valid: {_message(exc)}"}
                )
        if errors:
            raise SubmissionRejected(errors)
        try:
            return await self._follow_up(
                "EventCorrected",
                original,
                submitter,
                idempotency_key,
                request.model_dump(mode="json"),
                lambda: {
                    "corrects_event_id": original.event_id,
                    "corrects_reference": original.reference,
                    "corrected_event_type": original.event_type,
                    "changes": [c.avro() for c in changes],
                    "reason": request.reason,
                    "previous_subject_id": link and link.previous_subject_id,
                    "new_subject_id": link and link.new_subject_id,
                },
                link,
                local_authorities=_subject_authorities(original.event_type, patched)
                if any(c.field.split(".")[0] in SUBJECT_ADDRESSES[original.event_type] for c in changes)
                else None,
            )
        except SubjectMovedMeanwhile:
            raise SubmissionRejected(
                [{"field": "changes", "message": "the National Insurance number was corrected meanwhile"}]
            ) from None

    def _new_subject(self, original: _Original, nino: str | None, earlier: SubjectLink | None) -> SubjectLink:
        """The subject id a corrected NINO gives the registration (a keyed hash, as at intake)."""
        if earlier is not None:
            raise ValueError("the National Insurance number is corrected more than once")
        if nino == original.nino:
            raise ValueError("is the National Insurance number already recorded")
        return SubjectLink(
            corrected_event_id=original.event_id,
            previous_subject_id=original.person,
            new_subject_id=subject_id_for(nino, self.settings.require_pseudonym_key()),
        )

    async def void(
        self, reference: str, request: VoidRequest, submitter: Submitter, idempotency_key: str | None
    ) -> Recorded:
        if not submitter.may_void:
            raise NotPermitted("only a supervisor may void an event")
        original = await self._original(reference, submitter)
        return await self._follow_up(
            "EventVoided",
            original,
            submitter,
            idempotency_key,
            request.model_dump(mode="json"),
            lambda: {
                "voids_event_id": original.event_id,
                "voids_reference": original.reference,
                "voided_event_type": original.event_type,
                "reason": request.reason,
            },
        )

    async def _ensure_online_office(self) -> None:
        """The office whose key signs informants' requests, made with its first key if new
        (asked per request, not at start-up: intake starts while the database is away)."""
        try:
            await ensure_office(self.pool, ONLINE_OFFICE, "Tell Us Once online service", self.sealer)
        except AccountError:  # another intake process made it meanwhile
            pass

    async def request_services(
        self,
        reference: str,
        agencies: Sequence[str],
        details: Mapping[str, str],
        *,
        channel: Literal["online", "phone"],
        recorded_by: str,
        idempotency_key: str,
    ) -> Recorded:
        """The informant (online, or by phone through an agent) asks more organisations
        to be told of a registration, any office's, with the details each needs: their
        consent to each, with its receipt, and a ``ServicesRequested`` that only the
        chosen organisations are sent (each its own details), in one transaction. It is
        signed as the online service's, keyed by the registration's subject, so it
        reaches the agencies after the registration."""
        found = await original_event(self.pool, reference)
        if found is None or found.event_type not in PERSON_REGISTERED or found.voided:
            raise RequestRefused(
                [{"field": "reference", "message": "is not a registration that can be opened"}]
            )
        body = await as_corrected(self.pool, self.sealer, found)
        offered = {s.agency: s for s in await services(self.pool, found, body, datetime.now(UTC))}
        errors = request_problems(agencies, details, offered, body[PERSON_REGISTERED[found.event_type]])
        if errors:
            raise RequestRefused(errors)
        original = await self._as_original(found)
        await self._ensure_online_office()
        submitter = Submitter(
            ONLINE_OFFICE, "Tell Us Once online service", "registrar", recorded_by, recorded_by
        )
        chosen = sorted(set(agencies))
        return await self._record(
            event_type=SERVICES_REQUESTED,
            submitter=submitter,
            idempotency_key=idempotency_key,
            fingerprint_of={"original": found.reference, "agencies": chosen, "details": dict(details)},
            subject=models.SubjectIdentifiers(subject_id=original.subject_id, nino=original.nino),
            occurred_at=datetime.now(UTC),
            informant=models.Informant(**body["envelope"]["informant"]),
            channel=channel,
            body=lambda envelope: {
                "envelope": envelope.avro(),
                **services_requested_fields(found, body),
                **{name: details.get(name) for name in SERVICE_DETAILS},
            },
            consents=[ConsentChoice(agency=agency, choice="given") for agency in chosen],
            follows=found.event_id,
        )

    async def _original(self, reference: str, submitter: Submitter) -> _Original:
        found = await original_event(self.pool, reference)
        if found is None or found.office != submitter.office:
            raise NoSuchEvent(reference)
        if found.event_type not in REGISTRATIONS:
            raise SubmissionRejected(
                [{"field": "reference", "message": "only a registration can be corrected or voided"}]
            )
        if found.voided:
            raise SubmissionRejected([{"field": "reference", "message": "this event has been voided"}])
        return await self._as_original(found)

    async def _as_original(self, found: StoredEvent) -> _Original:
        _, body = decode(self.sealer.open(found.value, found.event_id))
        person, nino = found.subject_id, body["envelope"]["subject"].get("nino")
        latest = await latest_link(self.pool, found.event_id)
        if latest is not None:  # its NINO was corrected: the latest correction says whose it is
            _, correction = decode(self.sealer.open(latest.correction_value, latest.correction_event_id))
            person, nino = latest.new_subject_id, _corrected_nino(correction)
        return _Original(
            found.reference, found.event_id, found.event_type, found.subject_id, person, nino, body
        )

    async def _follow_up(
        self,
        event_type: str,
        original: _Original,
        submitter: Submitter,
        idempotency_key: str | None,
        request: dict[str, Any],
        fields: Any,
        link: SubjectLink | None = None,
        local_authorities: list[str] | None = None,
    ) -> Recorded:
        # Keyed by the original's subject id, even after its NINO was corrected: every
        # follow-up then lands on the original's partition, after it, in order.
        # The envelope carries the NINO as it stands now, for the agencies granted it.
        return await self._record(
            event_type=event_type,
            submitter=submitter,
            idempotency_key=idempotency_key,
            fingerprint_of={"original": original.reference, **request},
            subject=models.SubjectIdentifiers(subject_id=original.subject_id, nino=original.nino),
            occurred_at=datetime.now(UTC),
            informant=models.Informant(name=submitter.display_name, relationship="registration officer"),
            channel="system" if submitter.recorded_by.startswith("api:") else "desk",
            body=lambda envelope: {"envelope": envelope.avro(), **fields()},
            consents=[],
            follows=original.event_id,
            local_authorities=local_authorities,
            link=link,
        )

    def _end_of_consent(self, subject_id: str, event_type: str) -> EndOfConsent | None:
        source = self.consent_signer
        if source is None:
            return None

        async def end_of_consent(
            conn: asyncpg.Connection, consent_record_id: int, agency: str, recorded_at: datetime
        ) -> None:
            await announce(
                conn,
                self.settings,
                await source(conn, self.settings),
                consent_record_id=consent_record_id,
                subject_id=subject_id,
                agency=agency,
                event_type=event_type,
                choice="refused",
                recorded_by="informant",
                recorded_at=recorded_at,
            )

        return end_of_consent

    async def _record(
        self,
        *,
        event_type: str,
        submitter: Submitter,
        idempotency_key: str | None,
        fingerprint_of: dict[str, Any],
        subject: models.SubjectIdentifiers,
        occurred_at: datetime,
        informant: models.Informant,
        channel: str,
        body: Any,
        consents: list[ConsentChoice],
        follows: uuid.UUID | None = None,
        claims: tuple[str, ...] = (),
        override: Override | None = None,
        local_authorities: list[str] | None = None,
        link: SubjectLink | None = None,
    ) -> Recorded:
        now = datetime.now(UTC)
        event_id = uuid.uuid4()
        reference = new_reference(now)
        envelope = models.Envelope(
            event_id=event_id,
            reference=reference,
            occurred_at=occurred_at,
            recorded_at=now,
            subject=subject,
            informant=informant,
            channel=channel.upper(),
            registration_office=submitter.office,
            provenance=models.Provenance(source_system="tuo-intake", recorded_by=submitter.recorded_by),
        )
        record = body(envelope)
        value = encode(event_type, record)
        key = await self.signing_keys.of(submitter.office)
        cloud_events = headers_for(
            value,
            id=str(event_id),
            source="/offices/" + quote(submitter.office, safe=""),
            subject=subject.subject_id,
            time=now,
            schema_base_url=self.settings.schema_base_url(),
        )
        fingerprint = _fingerprint(event_type, submitter.office, fingerprint_of)
        message_key = subject.subject_id.encode()

        def signed(key: SigningKey) -> dict[str, Any]:
            headers = cloud_events + value_signature_headers(key, event_type, value, str(event_id))
            return {
                "headers": headers,
                "signing_key_id": key.key_id,
                # What a replay needs, read from the message as the router reads it.
                "routing_facts": routing_facts.seal(self.sealer, event_id, message_key, value, headers),
            }

        event = NewEvent(
            reference=reference,
            event_id=event_id,
            event_type=event_type,
            subject_id=subject.subject_id,
            registration_office=submitter.office,
            recorded_by=submitter.recorded_by,
            recorded_at=now,
            idempotency_key=None if idempotency_key is None else f"{submitter.office}:{idempotency_key}",
            request_fingerprint=fingerprint,
            consents=[(c.agency, c.choice) for c in consents],
            follows_event_id=follows,
            claims=claims,
            override=override,
            # A voided registration no longer stands in the way of a new one.
            releases_claims_of=follows if event_type == "EventVoided" else None,
            channel=channel,
            local_authorities=_subject_authorities(event_type, record)
            if event_type in SUBJECT_ADDRESSES
            else local_authorities,
            subject_link=link,
            end_of_consent=self._end_of_consent(subject.subject_id, event_type),
            topic=self.topics.life_events,
            message_key=message_key,
            message_value=self.sealer.seal(value, event_id),  # personal data: sealed at rest
            **signed(key),
        )
        try:
            recorded = await self.group_commit.record(event)
        except StaleSigningKey:  # the key was rotated before this process heard: sign again
            self.signing_keys.forget()
            key = await self.signing_keys.of(submitter.office)
            recorded = await self.group_commit.record(dataclasses.replace(event, **signed(key)))
        if recorded.created:  # committed with its outbox row; a repeated request adds nothing
            EVENTS_ACCEPTED.labels(event_type=recorded.event_type).inc()
        log.info(
            "event_accepted",
            event_id=str(recorded.event_id),
            event_type=recorded.event_type,
            office=submitter.office,
            replayed=not recorded.created,
        )
        return recorded


@dataclass(frozen=True)
class _Original:
    reference: str
    event_id: uuid.UUID
    event_type: str
    subject_id: str  # as recorded and keyed on the bus
    person: str  # whose it is now: subject_id, or the id a NINO correction gave it
    nino: str | None  # the subject's NINO now, after any correction of it
    body: dict[str, Any]


def _corrected_nino(correction: dict[str, Any]) -> str | None:
    change = next(c for c in correction["changes"] if c["field"] == NINO)
    nino: str | None = json.loads(change["new_value_json"])
    return nino


def _fingerprint(event_type: str, office: str, fingerprint_of: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps({"type": event_type, "office": office, **fingerprint_of}, sort_keys=True).encode()
    ).hexdigest()


def _message(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
    return str(exc)


def _checked_value(path: str, value: Any) -> Any:
    parts = path.split(".")
    if parts[0] in _UNCORRECTABLE:
        raise ValueError(
            f"{parts[0]} cannot be corrected"
            + ("" if parts[0] == "envelope" else ": it follows the fields it is derived from")
        )
    if parts[-1] in _DERIVED or _names_derived(value):
        raise ValueError("local_authority is looked up from the postcode: correct the postcode instead")
    rule = _LEAF_RULES.get(parts[-1])
    if rule is not None:
        checked = rule.validate_python(value)
        return checked.isoformat() if hasattr(checked, "isoformat") else checked
    if isinstance(value, str):
        return _TEXT.validate_python(value)
    return value


def _names_derived(value: Any) -> bool:
    """Whether a corrected value (any JSON, however deeply nested) names a derived field."""
    pending = [value]  # a loop, not recursion: the value is the submitter's
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if any(key in _DERIVED for key in item):
                return True
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _subject_authorities(event_type: str, record: dict[str, Any]) -> list[str]:
    """The GSS codes intake found for the subject's addresses in ``record`` (None left out)."""
    found = (record.get(name) or {} for name in SUBJECT_ADDRESSES.get(event_type, ()))
    return sorted({code for address in found if isinstance(code := address.get("local_authority"), str)})


def _rederived(event_type: str, patched: dict[str, Any], original: Any) -> Iterator[tuple[str, Any]]:
    """Set the derived facts in ``patched`` from its corrected fields; yield each that changed.
    A registration recorded before derived facts existed keeps none."""
    derived = derive(event_type, patched)
    if not any(original.get(name) is not None for name in derived):
        return
    for name, value in derived.items():
        if original.get(name) != value:
            patched[name] = value
            yield name, value


def _relocated(patched: Any, original: Any) -> Iterator[tuple[str, str | None]]:
    """Set each address's authority in ``patched`` from its postcode; yield the path and code
    of each whose postcode changed and whose authority differs from ``original``'s (an event
    from before authorities were recorded gains the field where a correction moves it)."""
    pending: list[tuple[Any, Any, str]] = [(patched, original, "")]  # a loop: values are the submitter's
    while pending:
        node, before, path = pending.pop()
        if isinstance(node, dict):
            if isinstance(node.get("postcode"), str):
                authority = local_authority(node["postcode"])
                node["local_authority"] = authority
                old = before if isinstance(before, dict) else {}
                if old.get("postcode") != node["postcode"] and old.get("local_authority") != authority:
                    yield f"{path}local_authority", authority
            for name, value in node.items():
                if isinstance(value, dict | list):
                    inner = before.get(name) if isinstance(before, dict) else None
                    pending.append((value, inner, f"{path}{name}."))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                inner = before[i] if isinstance(before, list) and i < len(before) else None
                pending.append((value, inner, f"{path}{i}."))
