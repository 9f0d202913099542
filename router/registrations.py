"""A registration as it stands now: the event as intake recorded it, with every
correction recorded since applied in order. What the informant's journey checks a
date of birth against, and what a request to tell more organisations carries
(``ServicesRequested``), with the organisations that may be asked."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from router.minimise import event_fields
from router.rules import RoutableEvent
from router.store import StoredEvent, load_subscriptions
from runtime.sealing import PayloadSealer
from runtime.web.i18n import N_
from schemas import decode, models
from schemas.fieldpaths import NINO
from schemas.identity_documents import driving_licence_problem, passport_problem

SERVICES_REQUESTED = "ServicesRequested"
# The office whose key signs what informants ask for themselves, online or by phone.
ONLINE_OFFICE = "online"
# Whose registration it is, and where they live or lived, by the kind of registration.
PERSON_REGISTERED = {"DeathRegistered": "deceased", "BirthRegistered": "child"}
ADDRESS_REGISTERED = {"DeathRegistered": "last_address", "BirthRegistered": "home_address"}
# The details an informant may give, each for the organisations granted it.
SERVICE_DETAILS = ("driving_licence_number", "passport_number", "blue_badge_number")
DETAIL_NAMES = {
    "driving_licence_number": N_("driving licence number"),
    "passport_number": N_("passport number"),
    "blue_badge_number": N_("Blue Badge number"),
}
_MISSING = {
    "driving_licence_number": N_("Enter the driving licence number"),
    "passport_number": N_("Enter the passport number"),
    "blue_badge_number": N_("Enter the Blue Badge number"),
}


@dataclass(frozen=True)
class Service:
    """An organisation the informant may ask to be told, and what it would be told."""

    agency: str
    fields: frozenset[str]

    @property
    def details(self) -> tuple[str, ...]:
        """The details it needs from the informant, in the order they are asked for."""
        return tuple(d for d in SERVICE_DETAILS if d in self.fields)


def services_requested_fields(event: StoredEvent, body: dict[str, Any]) -> dict[str, Any]:
    """What a request about this registration carries of it (``body`` as corrected)."""
    return {
        "requests_event_id": str(event.event_id),
        "requests_reference": event.reference,
        "requested_event_type": event.event_type,
        "person": body[PERSON_REGISTERED[event.event_type]],
        "date_of_death": body.get("date_of_death"),
        "address": body[ADDRESS_REGISTERED[event.event_type]],
    }


@dataclass(frozen=True)
class InformantRequest:
    """A request to tell more organisations, made after a registration."""

    reference: str
    recorded_at: datetime
    by_phone: bool  # through a contact-centre agent, not online by the informant


async def requests_following(pool: asyncpg.Pool, event_id: UUID) -> list[InformantRequest]:
    """The requests made about a registration, oldest first."""
    rows = await pool.fetch(
        "SELECT reference, recorded_at, recorded_by LIKE 'agent:%' AS by_phone FROM intake_record"
        " WHERE follows_event_id = $1 AND event_type = 'ServicesRequested'"
        " ORDER BY recorded_at, reference",
        event_id,
    )
    return [InformantRequest(r["reference"], r["recorded_at"], r["by_phone"]) for r in rows]


async def unlock_reference(pool: asyncpg.Pool, reference: str) -> bool:
    """The register office vouches for an informant whose wrong answers locked their
    reference (``citizens.informants``): it may be tried again. False if it was not locked."""
    result: str = await pool.execute("DELETE FROM informant_reference_lock WHERE reference = $1", reference)
    return result != "DELETE 0"


async def services(
    pool: asyncpg.Pool, event: StoredEvent, body: dict[str, Any], at: datetime
) -> list[Service]:
    """The organisations that take a request about this registration on consent, in
    force at ``at``, whose condition (a council's area) holds for its address: as the
    router would decide, so that nothing is offered that would then be withheld."""
    address = body[ADDRESS_REGISTERED[event.event_type]]
    authority = address.get("local_authority")
    routable = RoutableEvent(
        event_id=str(event.event_id),
        event_type=SERVICES_REQUESTED,
        subject_id=event.subject_id,
        fields=event_fields(SERVICES_REQUESTED),
        postcodes=frozenset({address["postcode"]}),
        local_authorities=frozenset({authority}) if authority else frozenset(),
        area_unknown=authority is None,
    )
    return sorted(
        (
            Service(s.agency, s.fields if s.fields is not None else routable.fields)
            for s in await load_subscriptions(pool)
            if s.event_type == SERVICES_REQUESTED
            and s.legal_basis == "consent"
            and s.in_force(at)
            and s.condition.holds_for(routable)
        ),
        key=lambda service: service.agency,
    )


async def corrections(pool: asyncpg.Pool, sealer: PayloadSealer, event_id: UUID) -> list[dict[str, Any]]:
    """Each correction of an event, decoded, oldest first."""
    rows = await pool.fetch(
        "SELECT c.event_id, o.message_value FROM intake_record c"
        "  JOIN LATERAL (SELECT message_value FROM outbox WHERE event_id = c.event_id"
        "                 ORDER BY id LIMIT 1) o ON true"
        " WHERE c.follows_event_id = $1 AND c.event_type = 'EventCorrected'"
        " ORDER BY c.recorded_at, c.reference",
        event_id,
    )
    return [decode(sealer.open(bytes(row["message_value"]), row["event_id"]))[1] for row in rows]


async def as_corrected(pool: asyncpg.Pool, sealer: PayloadSealer, event: StoredEvent) -> dict[str, Any]:
    """The registration's body with every correction applied, checked as its type's
    contract (so dates are dates again). The subject's NINO is as recorded: a corrected
    NINO makes another subject (``producers.store.latest_link``), not a field."""
    _, body = decode(sealer.open(event.value, event.event_id))
    patched = json.loads(json.dumps(body, default=str))
    for correction in await corrections(pool, sealer, event.event_id):
        for change in correction.get("changes", []):
            if change["field"] != NINO:
                patch(patched, change["field"], json.loads(change["new_value_json"]))
    return models.TOP_LEVEL_MODELS[event.event_type].model_validate(patched).avro()


def patch(record: dict[str, Any], path: str, value: Any) -> None:
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
    elif last == NINO:
        raise ValueError(f"{path} is not a field of the original event; the subject's own is the field nino")
    else:
        raise ValueError(f"{path} is not a field of the original event")


def _child(node: Any, part: str, path: str) -> Any:
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    if isinstance(node, dict) and part in node:
        return node[part]
    raise ValueError(f"{path} is not a field of the original event")


class RequestRefused(ValueError):
    """A request to tell more organisations that cannot be recorded; ``errors`` says,
    field by field (``agencies``, ``details.<name>``, ``reference``), what is wrong."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))
        self.errors = errors


def request_problems(
    agencies: Sequence[str],
    details: Mapping[str, str],
    offered: Mapping[str, Service],
    person: Mapping[str, Any],
) -> list[dict[str, str]]:
    """What is wrong with a request: an organisation not offered for this registration, a
    detail none of the chosen needs or one a chosen organisation needs left out, a number
    not as the document prints it (a licence's checked against the person registered)."""
    errors = [
        {"field": f"agencies.{i}", "message": f"{agency[:50]!r} cannot be asked about this registration"}
        for i, agency in enumerate(agencies)
        if agency not in offered
    ]
    if not agencies:
        errors.append({"field": "agencies", "message": N_("Choose at least one organisation to tell")})
    needed = {d for agency in agencies if agency in offered for d in offered[agency].details}
    for name in sorted(set(details) | needed):
        value = details.get(name, "")
        problem = None
        if name not in needed:
            problem = N_("No organisation chosen needs it") if value else None
        elif not value:
            problem = _MISSING.get(name, N_("Enter the number"))
        elif name == "driving_licence_number":
            problem = driving_licence_problem(value, person["family_name"], person["date_of_birth"])
        elif name == "passport_number":
            problem = passport_problem(value)
        elif len(value) > 40:
            problem = N_("It is longer than any such number")
        if problem:
            errors.append({"field": f"details.{name[:50]}", "message": problem})
    return errors
