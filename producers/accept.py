"""Accepting an event: the one path every channel (JSON API, HTML forms) takes.

A submission, correction or void is checked, given a reference number and an
envelope, encoded against the contract, signed with the office's key, and
stored with its outbox row in one transaction. Nothing is written unless the
whole request is valid.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

import asyncpg
import structlog
from pydantic import Field, TypeAdapter, ValidationError

from producers.accounts import Submitter
from producers.office_keys import active_key
from producers.requests import ConsentChoice, Strict, Submission
from producers.store import EndOfConsent, NewEvent, Recorded, consent_agencies, original_event, record_event
from router.consent_changes import announce
from runtime.kafka import Topics
from runtime.metrics import EVENTS_ACCEPTED
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from schemas import decode, encode, models
from schemas.cloudevents import headers_for
from schemas.consent_signatures import ConsentSigner
from schemas.signatures import signature_headers
from schemas.validation import Nino, PastDate, Postcode, Text, Uprn

log = structlog.get_logger(__name__)

# Crockford base32 without I, L, O, U: unambiguous when read out over the phone.
REFERENCE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_reference(now: datetime) -> str:
    chars = "".join(secrets.choice(REFERENCE_ALPHABET) for _ in range(8))
    return f"TUO-{now:%Y}-{chars[:4]}-{chars[4:]}"


def subject_id_for(person_nino: str | None, key: bytes) -> str:
    """Pseudonymous subject id: keyed hash of the NINO, or random when unknown."""
    if person_nino is None:
        return f"s-{uuid.uuid4().hex}"
    digest = hmac.new(key, person_nino.encode(), hashlib.sha256).hexdigest()
    return f"n-{digest[:32]}"


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
        pattern=r"^[a-z_]+(\.([a-z_]+|[0-9]{1,2}))*$",
        description="Dotted path into the original event, for example `deceased.date_of_birth`.",
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
_UNCORRECTABLE = ("envelope",)
REGISTRATIONS = ("BirthRegistered", "DeathRegistered", "AddressChanged")


# The consent service's signing key, read on intake's connection (citizens.consent_receipts
# .consent_signer_within, handed in by the app: producers do not import citizens).
ConsentSignerSource = Callable[[asyncpg.Connection, Settings], Awaitable[ConsentSigner]]


@dataclass(frozen=True)
class Intake:
    """What accepting needs: settings, the database, topic names and the pseudonym key;
    with ``consent_signer``, an informant's refusal that ends a consent given before is
    passed on to the agencies holding data under it (``router.consent_changes``)."""

    settings: Settings
    pool: asyncpg.Pool
    consent_signer: ConsentSignerSource | None = None

    @property
    def topics(self) -> Topics:
        return Topics(self.settings.topic_prefix)

    @functools.cached_property  # once per app, not per event (works on a frozen dataclass)
    def sealer(self) -> PayloadSealer:
        return PayloadSealer.from_settings(self.settings)

    async def accept(
        self,
        submission: Submission,
        submitter: Submitter,
        idempotency_key: str | None,
        channel: Literal["desk", "phone", "online", "system"] | None = None,
    ) -> Recorded:
        """Record a birth, death or change of address."""
        if submission.registration_office not in (None, submitter.office):
            raise SubmissionRejected(
                [{"field": "registration_office", "message": "is not the office your credentials are for"}]
            )
        allowed = await consent_agencies(self.pool, submission.event_type)
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
        subject = subject_id_for(person.nino, self.settings.require_pseudonym_key())
        return await self._record(
            event_type=submission.event_type,
            submitter=submitter,
            idempotency_key=idempotency_key,
            fingerprint_of=submission.model_dump(mode="json"),
            subject=models.SubjectIdentifiers(subject_id=subject, nino=person.nino),
            occurred_at=submission.occurred_at(),
            informant=models.Informant(**submission.informant.model_dump()),
            channel=channel or submission.channel,
            body=lambda envelope: submission.contract(envelope).avro(),
            consents=submission.consents,
        )

    async def correct(
        self, reference: str, request: CorrectionRequest, submitter: Submitter, idempotency_key: str | None
    ) -> Recorded:
        original = await self._original(reference, submitter)
        patched = json.loads(json.dumps(original.body, default=str))
        errors: list[dict[str, str]] = []
        changes = []
        for i, change in enumerate(request.changes):
            try:
                value = _checked_value(change.field, change.value)
                _patch(patched, change.field, value)
            except (ValueError, ValidationError) as exc:
                errors.append({"field": f"changes.{i}", "message": _message(exc)})
                continue
            changes.append(models.FieldChange(field=change.field, new_value_json=json.dumps(value)))
        if not errors:
            try:
                models.TOP_LEVEL_MODELS[original.event_type].model_validate(patched)
            except ValidationError as exc:
                errors.append(
                    {"field": "changes", "message": f"the corrected event is not valid: {_message(exc)}"}
                )
        if errors:
            raise SubmissionRejected(errors)
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
            },
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
        _, body = decode(self.sealer.open(found.value, found.event_id))
        return _Original(found.reference, found.event_id, found.event_type, found.subject_id, body)

    async def _follow_up(
        self,
        event_type: str,
        original: _Original,
        submitter: Submitter,
        idempotency_key: str | None,
        request: dict[str, Any],
        fields: Any,
    ) -> Recorded:
        subject = original.body["envelope"]["subject"]
        return await self._record(
            event_type=event_type,
            submitter=submitter,
            idempotency_key=idempotency_key,
            fingerprint_of={"original": original.reference, **request},
            subject=models.SubjectIdentifiers(subject_id=original.subject_id, nino=subject.get("nino")),
            occurred_at=datetime.now(UTC),
            informant=models.Informant(name=submitter.display_name, relationship="registration officer"),
            channel="system" if submitter.recorded_by.startswith("api:") else "desk",
            body=lambda envelope: {"envelope": envelope.avro(), **fields()},
            consents=[],
            follows=original.event_id,
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
        key = await active_key(self.pool, submitter.office)
        headers = headers_for(
            value,
            id=str(event_id),
            source="/offices/" + quote(submitter.office, safe=""),
            subject=subject.subject_id,
            time=now,
            schema_base_url=self.settings.schema_base_url(),
        )
        headers += signature_headers(key, event_type, record, str(event_id))
        fingerprint = hashlib.sha256(
            json.dumps(
                {"type": event_type, "office": submitter.office, **fingerprint_of}, sort_keys=True
            ).encode()
        ).hexdigest()
        recorded = await record_event(
            self.pool,
            NewEvent(
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
                end_of_consent=self._end_of_consent(subject.subject_id, event_type),
                topic=self.topics.life_events,
                message_key=subject.subject_id.encode(),
                message_value=self.sealer.seal(value, event_id),  # personal data: sealed at rest
                headers=headers,
            ),
        )
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
    subject_id: str
    body: dict[str, Any]


def _message(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
    return str(exc)


def _checked_value(path: str, value: Any) -> Any:
    parts = path.split(".")
    if parts[0] in _UNCORRECTABLE:
        raise ValueError(f"{parts[0]} cannot be corrected")
    rule = _LEAF_RULES.get(parts[-1])
    if rule is not None:
        checked = rule.validate_python(value)
        return checked.isoformat() if hasattr(checked, "isoformat") else checked
    if isinstance(value, str):
        return _TEXT.validate_python(value)
    return value


def _patch(record: dict[str, Any], path: str, value: Any) -> None:
    """Set ``value`` at the dotted ``path``, which must already exist in the event."""
    *parents, last = path.split(".")
    node: Any = record
    for part in parents:
        node = _child(node, part, path)
        if node is None:
            raise ValueError(f"{path} is not in the original event (its parent is empty)")
    if isinstance(node, list):
        index = int(last)
        if index >= len(node):
            raise ValueError(f"{path} is not in the original event")
        node[index] = value
    elif isinstance(node, dict) and last in node:
        node[last] = value
    else:
        raise ValueError(f"{path} is not a field of the original event")


def _child(node: Any, part: str, path: str) -> Any:
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    if isinstance(node, dict) and part in node:
        return node[part]
    raise ValueError(f"{path} is not a field of the original event")
