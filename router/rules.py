"""The routing rule, as a pure function: (event, subscriptions, consent) → decisions.

An event goes to an agency only if an active, currently valid subscription
covers its type and (the basis is statutory, or consent is currently given).
Every agency that subscribes to anything gets a decision, so the citizen can
see what was withheld as well as what was sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Literal

ConsentState = Literal["given", "refused", "withdrawn"]


class Outcome(StrEnum):
    DELIVERED = "DELIVERED"
    WITHHELD_NO_CONSENT = "WITHHELD_NO_CONSENT"
    WITHHELD_NO_SUBSCRIPTION = "WITHHELD_NO_SUBSCRIPTION"


@dataclass(frozen=True)
class Subscription:
    agency: str
    event_type: str
    legal_basis: Literal["statutory", "consent"]
    statute: str | None
    valid_from: datetime | None
    valid_to: datetime | None
    status: Literal["active", "suspended"]

    def in_force(self, at: datetime) -> bool:
        started = self.valid_from is None or self.valid_from <= at
        not_ended = self.valid_to is None or at < self.valid_to
        return self.status == "active" and started and not_ended

    def basis_text(self) -> str:
        return f"statutory: {self.statute}" if self.legal_basis == "statutory" else "consent"


@dataclass(frozen=True)
class RoutableEvent:
    event_id: str
    event_type: str
    subject_id: str


@dataclass(frozen=True)
class RoutingDecision:
    event_id: str
    event_type: str
    agency: str
    outcome: Outcome
    legal_basis: str | None

    @property
    def delivers(self) -> bool:
        return self.outcome is Outcome.DELIVERED


def decide(
    event: RoutableEvent,
    subscriptions: Iterable[Subscription],
    consent: Mapping[str, ConsentState],
    at: datetime,
) -> list[RoutingDecision]:
    """One decision per agency that has any subscription; ``consent`` maps agency
    to the subject's current choice for this event type."""
    by_agency: dict[str, Subscription | None] = {}
    for subscription in subscriptions:
        by_agency.setdefault(subscription.agency, None)
        if subscription.event_type == event.event_type and subscription.in_force(at):
            by_agency[subscription.agency] = subscription
    decisions = []
    for agency, covering in sorted(by_agency.items()):
        if covering is None:
            outcome, basis = Outcome.WITHHELD_NO_SUBSCRIPTION, None
        elif covering.legal_basis == "statutory":
            outcome, basis = Outcome.DELIVERED, covering.basis_text()
        elif consent.get(agency) == "given":
            outcome, basis = Outcome.DELIVERED, "consent"
        else:
            outcome, basis = Outcome.WITHHELD_NO_CONSENT, "consent"
        decisions.append(RoutingDecision(event.event_id, event.event_type, agency, outcome, basis))
    return decisions
