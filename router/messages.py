"""A life-events message as the router reads it, and each agency's copy of it.

Shared by the router (``router.service``) and replay (``operators.replay``): both
decide with ``router.rules`` and send an agency exactly this copy, minimised to
the fields it is entitled to, with the office's signature disclosing only those.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka.structs import ConsumerRecord

from router.minimise import Copies, event_fields, minimise_envelope
from router.rules import SUBJECT_ADDRESSES, RoutableEvent, RoutingDecision
from runtime.kafka import Topics
from schemas import UndecodableMessage, decode, encode
from schemas.catalogue import DISCLOSURE_SUFFIX, LIFE_EVENTS
from schemas.cloudevents import REDELIVER_TO, REDELIVERY_ID, CloudEvent, MissingCloudEventHeader, headers_for
from schemas.fieldpaths import covered
from schemas.signatures import (
    ENVELOPE,
    OfficeKey,
    SignatureRejected,
    SignedEvent,
    element_item,
    items,
    read_signature,
    verify,
)

OPERATOR_HEADERS = (REDELIVER_TO, REDELIVERY_ID)  # meant for the router, never passed on


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
    time: datetime | None = None  # ce_time: when the event happened, as the office said


FOLLOW_UPS = {
    "EventCorrected": ("corrects_event_id", "corrected_event_type"),
    "EventVoided": ("voids_event_id", "voided_event_type"),
}


def _subject_addresses(event_type: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for field in SUBJECT_ADDRESSES.get(event_type, ()):
        address = body.get(field)
        if isinstance(address, dict):
            yield address


def _postcodes(event_type: str, body: dict[str, Any]) -> Iterator[str]:
    for address in _subject_addresses(event_type, body):
        if isinstance(address.get("postcode"), str):
            yield address["postcode"]


def _local_authorities(event_type: str, body: dict[str, Any]) -> list[str | None]:
    """The GSS code intake found for each of the subject's addresses; None where it found
    none (a postcode the directory does not know, or an event written before it looked)."""
    return [
        code if isinstance(code := address.get("local_authority"), str) else None
        for address in _subject_addresses(event_type, body)
    ]


def routable(record: ConsumerRecord[bytes, bytes]) -> Incoming:
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
            record,
            event,
            body,
            cloud_event.source,
            signed,
            follows=(str(body[id_field]), body[type_field]),
            time=cloud_event.time,
        )
    authorities = _local_authorities(subject, body)
    event = RoutableEvent(
        event_id=cloud_event.id,
        event_type=subject,
        subject_id=subject_id,
        fields=event_fields(subject),
        postcodes=frozenset(_postcodes(subject, body)),
        local_authorities=frozenset(code for code in authorities if code is not None),
        area_unknown=None in authorities,
    )
    return Incoming(record, event, body, cloud_event.source, signed, time=cloud_event.time)


def verify_signature(incoming: Incoming, keys: Mapping[str, OfficeKey]) -> None:
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


def agency_copy(
    topics: Topics,
    incoming: Incoming,
    decision: RoutingDecision,
    schema_base_url: str,
    copies: Copies | None = None,
) -> Outgoing:
    """The agency's message: the event, or the correction or void, as a disclosure
    carrying only the paths ``decision`` delivers, with the office's signature
    disclosing only those. ``copies``: the event's other copies so far, whose fields
    this one shares where it can (a life event's only)."""
    event = incoming.event
    if incoming.follows is None:
        copies = copies or Copies(event.event_type, incoming.body, incoming.record.value)
        value = copies.encoded(decision.fields_delivered)
        disclosed = copies.disclosed(decision.fields_delivered)
    else:
        copy, disclosed = _follow_up(incoming, decision.fields_delivered)
        value = encode(f"{event.event_type}{DISCLOSURE_SUFFIX}", copy)
    headers = headers_for(
        value,
        id=event.event_id,
        type=event.event_type,
        source=incoming.source,
        subject=event.subject_id,
        time=incoming.time or datetime.now(UTC),
        schema_base_url=schema_base_url,
    )
    # The office's signature travels on, with the salts of the delivered items only:
    # the agency can check what it got and learns nothing about what it did not.
    headers += incoming.signed.headers(disclose=disclosed)
    return Outgoing(topics.agency(decision.agency), incoming.record.key, value, headers)


def disclosed_items(event_type: str, copy: Mapping[str, Any]) -> set[str]:
    """The signed items a copy carries, whose salts it discloses: the envelope, and
    every item with a value (a withheld or null item needs no salt)."""
    return {ENVELOPE} | {name for name, value in items(event_type, copy).items() if value not in (None, [])}


def _follow_up(incoming: Incoming, received: frozenset[str]) -> tuple[dict[str, Any], set[str]]:
    """A correction or void for an agency that received the original (``received``:
    the paths it got): the envelope's personal fields only where the original
    carried them, and a correction's changes only within those paths."""
    body = dict(incoming.body)
    body["envelope"] = minimise_envelope(body["envelope"], received)
    changes = body.get("changes", [])
    kept = [i for i, change in enumerate(changes) if covered(change["field"], received)]
    if "changes" in body:
        body["changes"] = [changes[i] for i in kept]
    disclosed = disclosed_items(incoming.event.event_type, {**body, "changes": []})
    disclosed |= {element_item("changes", i) for i in kept}
    body["withheld_fields"] = []
    return body, disclosed
