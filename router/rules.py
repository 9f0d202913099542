"""The routing rule, as a pure function: (event, subscriptions, consent, policy) → decisions.

An event goes to an agency only if policy does not block the pair, an active,
currently valid subscription covers its type and its condition holds (for
example a council's postcode area), and the basis is statutory or the subject's
consent is currently given. The agency then receives only the subscription's
fields. Every agency that subscribes to anything gets a decision, so the citizen
can see what was withheld, and why, as well as what was sent.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Condition:
    """When a subscription applies. Empty means always."""

    postcode_areas: frozenset[str] = frozenset()  # outward-code prefixes, e.g. "LS", "BD1"

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Condition:
        if not data:
            return cls()
        return cls(
            postcode_areas=frozenset(str(p).upper().replace(" ", "") for p in data.get("postcode_areas", []))
        )

    def holds_for(self, event: RoutableEvent) -> bool:
        if not self.postcode_areas:
            return True
        return any(
            _outward(postcode).startswith(area) and _area_matches(_outward(postcode), area)
            for postcode in event.postcodes
            for area in self.postcode_areas
        )

    def describe(self) -> str:
        return "postcode area " + ", ".join(sorted(self.postcode_areas)) if self.postcode_areas else "always"


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


@dataclass(frozen=True)
class RoutingDecision:
    event_id: str
    event_type: str
    agency: str
    outcome: Outcome
    legal_basis: str | None
    fields_delivered: frozenset[str] = frozenset()
    fields_withheld: frozenset[str] = frozenset()

    @property
    def delivers(self) -> bool:
        return self.outcome is Outcome.DELIVERED


def decide(
    event: RoutableEvent,
    subscriptions: Iterable[Subscription],
    consent: Mapping[str, ConsentState],
    at: datetime,
    policy: Iterable[PolicyBlock] = (),
) -> list[RoutingDecision]:
    """One decision per agency that has any subscription; ``consent`` maps agency
    to the subject's current choice for this event type."""
    blocks = list(policy)
    by_agency: dict[str, Subscription | None] = {}
    for subscription in subscriptions:
        by_agency.setdefault(subscription.agency, None)
        if (
            subscription.event_type == event.event_type
            and subscription.in_force(at)
            and subscription.condition.holds_for(event)
        ):
            by_agency[subscription.agency] = subscription
    decisions = []
    for agency, covering in sorted(by_agency.items()):
        block = next((b for b in blocks if b.blocks(event.event_type, agency)), None)
        if block is not None:
            decisions.append(_withheld(event, agency, Outcome.BLOCKED, f"policy: {block.reason}"))
        elif covering is None:
            decisions.append(_withheld(event, agency, Outcome.WITHHELD_NO_SUBSCRIPTION, None))
        elif covering.legal_basis == "consent" and consent.get(agency) != "given":
            decisions.append(_withheld(event, agency, Outcome.WITHHELD_NO_CONSENT, "consent"))
        else:
            allowed = event.fields if covering.fields is None else event.fields & covering.fields
            decisions.append(
                RoutingDecision(
                    event.event_id,
                    event.event_type,
                    agency,
                    Outcome.DELIVERED,
                    covering.basis_text(),
                    fields_delivered=allowed,
                    fields_withheld=event.fields - allowed,
                )
            )
    return decisions


def _withheld(event: RoutableEvent, agency: str, outcome: Outcome, basis: str | None) -> RoutingDecision:
    return RoutingDecision(
        event.event_id, event.event_type, agency, outcome, basis, fields_withheld=event.fields
    )


@dataclass(frozen=True)
class OriginalDelivery:
    """How an earlier event reached one agency: what a correction or void follows."""

    agency: str
    legal_basis: str | None
    fields_delivered: frozenset[str]


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
            decisions.append(_withheld(event, agency, Outcome.WITHHELD_NO_CONSENT, "consent"))
        else:
            decisions.append(
                RoutingDecision(
                    event.event_id,
                    event.event_type,
                    agency,
                    Outcome.DELIVERED,
                    original.legal_basis,
                    fields_delivered=original.fields_delivered,
                )
            )
    return decisions
