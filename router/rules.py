"""The routing rule, as a pure function: (event, subscriptions, consent, policy) → decisions.

An event goes to an agency only if policy does not block the pair, an active,
currently valid subscription covers its type and its condition holds (for
example a council's local authority), and the basis is statutory or the subject's
consent is currently given. The agency then receives only the subscription's
fields. Every agency that subscribes to anything gets a decision, so the citizen
can see what was withheld, and why, as well as what was sent.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

ConsentState = Literal["given", "refused", "withdrawn"]


class Outcome(StrEnum):
    DELIVERED = "DELIVERED"
    WITHHELD_NO_CONSENT = "WITHHELD_NO_CONSENT"
    WITHHELD_NO_SUBSCRIPTION = "WITHHELD_NO_SUBSCRIPTION"
    BLOCKED = "BLOCKED"
    # A council's condition could not be decided: an address's postcode is not in the
    # ONS Postcode Directory, so its local authority is unknown.
    WITHHELD_AREA_UNKNOWN = "WITHHELD_AREA_UNKNOWN"
    # The subscription covers only the people the agency registered an interest in (its
    # afnemersindicatie, as the Dutch BRP calls it), and this subject is not one of them.
    WITHHELD_NOT_OF_INTEREST = "WITHHELD_NOT_OF_INTEREST"


@dataclass(frozen=True)
class Condition:
    """When a subscription applies. Empty means always.

    A council names its local authorities by GSS code (``{"local_authorities":
    ["E08000035"]}``, Leeds): it hears of an event when the authority of one of
    the subject's addresses, which intake stored in the event, is one of them.
    ``postcode_areas`` (outward-code prefixes such as "LS") is the older kind,
    still read so that a row written before migration 0020 keeps working; it is
    wrong at the edges (LS29 is in Bradford), so no new subscription gets one.
    """

    local_authorities: frozenset[str] = frozenset()  # GSS codes, e.g. "E08000032" (Bradford)
    postcode_areas: frozenset[str] = frozenset()  # outward-code prefixes, e.g. "LS", "BD1"
    # Only the subjects the agency registered an interest in (``agency_interest``).
    registered_subjects: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Condition:
        if not data:
            return cls()
        return cls(
            local_authorities=frozenset(str(c).strip().upper() for c in data.get("local_authorities", [])),
            postcode_areas=frozenset(str(p).upper().replace(" ", "") for p in data.get("postcode_areas", [])),
            registered_subjects=data.get("registered_subjects") is True,
        )

    def to_json(self) -> dict[str, Any] | None:
        found: dict[str, Any] = {
            name: sorted(values)
            for name, values in (
                ("local_authorities", self.local_authorities),
                ("postcode_areas", self.postcode_areas),
            )
            if values
        }
        if self.registered_subjects:
            found["registered_subjects"] = True
        return found or None

    def holds_for(self, event: RoutableEvent) -> bool:
        in_authority = not self.local_authorities or bool(self.local_authorities & event.local_authorities)
        in_area = not self.postcode_areas or any(
            _outward(postcode).startswith(area) and _area_matches(_outward(postcode), area)
            for postcode in event.postcodes
            for area in self.postcode_areas
        )
        return in_authority and in_area

    def undecided_for(self, event: RoutableEvent) -> bool:
        """The condition names authorities, none of the event's known ones is among them,
        and an address's authority is unknown: it might have held. The decision says
        so ("withheld: area unknown") rather than claiming the agency has no business."""
        return bool(self.local_authorities) and event.area_unknown and not self.holds_for(event)

    def concerns(self, local_authorities: frozenset[str]) -> bool:
        """Whether someone living or who lived in ``local_authorities`` is this condition's
        business, for listing the choices that concern a person. An older postcode-area
        condition cannot be judged without the postcodes, so it is not ruled out."""
        return not self.local_authorities or bool(self.local_authorities & local_authorities)

    def describe(self) -> str:
        parts = []
        if self.local_authorities:
            parts.append("local authority " + ", ".join(sorted(self.local_authorities)))
        if self.postcode_areas:
            parts.append("postcode area " + ", ".join(sorted(self.postcode_areas)))
        if self.registered_subjects:
            parts.append("registered subjects only")
        return "; ".join(parts) or "always"


# The addresses a condition looks at: where the subject lives or lived, never where an
# executor, next of kin or partner lives. Intake records their authorities too.
SUBJECT_ADDRESSES = {
    "BirthRegistered": ("home_address",),
    "DeathRegistered": ("last_address",),
    "AddressChanged": ("old_address", "new_address"),
    "ServicesRequested": ("address",),
}


def _outward(postcode: str) -> str:
    return postcode.upper().split(" ")[0]


def _area_matches(outward: str, area: str) -> bool:
    # "LS" covers LS1..LS29 but not LSX; "BD1" covers BD1 only, not BD10.
    rest = outward[len(area) :]
    return rest == "" or (area[-1].isalpha() and rest[0].isdigit())


@dataclass(frozen=True)
class Subscription:
    agency: str
    event_type: str
    legal_basis: Literal["statutory", "consent"]
    statute: str | None
    valid_from: datetime | None
    valid_to: datetime | None
    status: Literal["active", "suspended"]
    fields: frozenset[str] | None = None  # None: every field of the event
    condition: Condition = field(default_factory=Condition)
    version: int | None = None  # its row in subscription_version (router.subscription_versions)

    def in_force(self, at: datetime) -> bool:
        started = self.valid_from is None or self.valid_from <= at
        not_ended = self.valid_to is None or at < self.valid_to
        return self.status == "active" and started and not_ended

    def basis_text(self) -> str:
        return f"statutory: {self.statute}" if self.legal_basis == "statutory" else "consent"


@dataclass(frozen=True)
class PolicyBlock:
    """Never route these event types to these agencies, whatever the subscriptions say."""

    event_types: frozenset[str]
    agencies: frozenset[str]
    reason: str

    def blocks(self, event_type: str, agency: str) -> bool:
        return event_type in self.event_types and agency in self.agencies


@dataclass(frozen=True)
class RoutableEvent:
    event_id: str
    event_type: str
    subject_id: str
    fields: frozenset[str] = frozenset()  # the event's own fields, beyond the envelope
    postcodes: frozenset[str] = frozenset()  # every address in the event
    local_authorities: frozenset[str] = frozenset()  # GSS codes of the subject's addresses
    area_unknown: bool = False  # a subject's address whose authority intake could not find


@dataclass(frozen=True)
class RoutingDecision:
    event_id: str
    event_type: str
    agency: str
    outcome: Outcome
    legal_basis: str | None
    fields_delivered: frozenset[str] = frozenset()
    fields_withheld: frozenset[str] = frozenset()
    # The version of the subscription the decision was made on; None where none covered it.
    subscription_version: int | None = None

    @property
    def delivers(self) -> bool:
        return self.outcome is Outcome.DELIVERED


def decide(
    event: RoutableEvent,
    subscriptions: Iterable[Subscription],
    consent: Mapping[str, ConsentState],
    at: datetime,
    policy: Iterable[PolicyBlock] = (),
    interested: frozenset[str] = frozenset(),
) -> list[RoutingDecision]:
    """One decision per agency that has any subscription; ``consent`` maps agency
    to the subject's current choice for this event type; ``interested`` names the
    agencies that registered an interest in the subject."""
    blocks = list(policy)
    by_agency: dict[str, Subscription | None] = {}
    area_unknown: set[str] = set()
    for subscription in subscriptions:
        by_agency.setdefault(subscription.agency, None)
        if subscription.event_type == event.event_type and subscription.in_force(at):
            if subscription.condition.holds_for(event):
                by_agency[subscription.agency] = subscription
            elif subscription.condition.undecided_for(event):
                area_unknown.add(subscription.agency)
    decisions = []
    for agency, covering in sorted(by_agency.items()):
        block = next((b for b in blocks if b.blocks(event.event_type, agency)), None)
        if block is not None:
            decisions.append(_withheld(event, agency, Outcome.BLOCKED, f"policy: {block.reason}"))
        elif covering is None and agency in area_unknown:
            decisions.append(_withheld(event, agency, Outcome.WITHHELD_AREA_UNKNOWN, None))
        elif covering is None:
            decisions.append(_withheld(event, agency, Outcome.WITHHELD_NO_SUBSCRIPTION, None))
        elif covering.condition.registered_subjects and agency not in interested:
            decisions.append(
                _withheld(event, agency, Outcome.WITHHELD_NOT_OF_INTEREST, None, covering.version)
            )
        elif covering.legal_basis == "consent" and consent.get(agency) != "given":
            decisions.append(
                _withheld(event, agency, Outcome.WITHHELD_NO_CONSENT, "consent", covering.version)
            )
        else:
            allowed, withheld = _granted(event.fields, covering.fields)
            decisions.append(
                RoutingDecision(
                    event.event_id,
                    event.event_type,
                    agency,
                    Outcome.DELIVERED,
                    covering.basis_text(),
                    fields_delivered=allowed,
                    fields_withheld=withheld,
                    subscription_version=covering.version,
                )
            )
    return decisions


@functools.lru_cache(maxsize=1024)
def _granted(fields: frozenset[str], granted: frozenset[str] | None) -> tuple[frozenset[str], frozenset[str]]:
    """The event's fields a grant delivers and those it withholds: the same two sets for
    every event of a type to an agency, so one pair of them (and what is cached on them
    downstream, the copy's cut and disclosure, finds them by identity)."""
    allowed = fields if granted is None else fields & granted
    return allowed, fields - allowed


def _withheld(
    event: RoutableEvent, agency: str, outcome: Outcome, basis: str | None, version: int | None = None
) -> RoutingDecision:
    return RoutingDecision(
        event.event_id,
        event.event_type,
        agency,
        outcome,
        basis,
        fields_withheld=event.fields,
        subscription_version=version,
    )


@dataclass(frozen=True)
class OriginalDelivery:
    """How an earlier event reached one agency: what a correction or void follows."""

    agency: str
    legal_basis: str | None
    fields_delivered: frozenset[str]
    subscription_version: int | None = None


def decide_follow_up(
    event: RoutableEvent,
    original_type: str,
    deliveries: Iterable[OriginalDelivery],
    agencies: Iterable[str],
    consent: Mapping[str, ConsentState],
    policy: Iterable[PolicyBlock] = (),
) -> list[RoutingDecision]:
    """A correction or void goes to exactly the agencies that received the original
    (no one else), on the original's basis, within the original's fields — and,
    where that basis was consent, only while consent is still given."""
    blocks = list(policy)
    received = {d.agency: d for d in deliveries}
    decisions = []
    for agency in sorted(set(agencies) | set(received)):
        original = received.get(agency)
        if any(b.blocks(original_type, agency) or b.blocks(event.event_type, agency) for b in blocks):
            decisions.append(_withheld(event, agency, Outcome.BLOCKED, "policy"))
        elif original is None:
            decisions.append(_withheld(event, agency, Outcome.WITHHELD_NO_SUBSCRIPTION, None))
        elif original.legal_basis == "consent" and consent.get(agency) != "given":
            decisions.append(
                _withheld(
                    event, agency, Outcome.WITHHELD_NO_CONSENT, "consent", original.subscription_version
                )
            )
        else:
            decisions.append(
                RoutingDecision(
                    event.event_id,
                    event.event_type,
                    agency,
                    Outcome.DELIVERED,
                    original.legal_basis,
                    fields_delivered=original.fields_delivered,
                    subscription_version=original.subscription_version,
                )
            )
    return decisions
