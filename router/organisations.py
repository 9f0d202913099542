"""Which organisations will be told of an event, and where each has got to.

The "Which organisations should we tell?" step lists the active subscriptions
for the event type whose conditions hold for the addresses given (a council
only hears of addresses in its local authority, old and new for a move, found
in the ONS Postcode Directory): a statutory one is told whatever the
informant says (the page names the law), a consent one only if the informant
agrees. After the
event is recorded, the confirmation page turns each agency's routing decision
and latest receipt into words a registrar can read out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg

from router.rules import Condition, RoutableEvent
from runtime.local_authorities import local_authority
from runtime.web.i18n import N_

# Display names of the agencies in the demo subscriptions; any other agency is
# shown by a name derived from its code.
AGENCY_NAMES = {
    "hmrc": N_("HM Revenue and Customs"),
    "dwp": N_("Department for Work and Pensions"),
    "dvla": N_("Driver and Vehicle Licensing Agency"),
    "hmpo": N_("HM Passport Office"),
    "council-leeds": N_("Leeds City Council"),
    "council-bradford": N_("City of Bradford Metropolitan District Council"),
    "ons": N_("Office for National Statistics"),
}


def agency_name(agency: str) -> str:
    known = AGENCY_NAMES.get(agency)
    if known is not None:
        return known
    if agency.startswith("council-"):
        place = agency.removeprefix("council-").replace("-", " ").title()
        return f"{place} Council"
    return agency.upper() if len(agency) <= 5 else agency


@dataclass(frozen=True)
class Organisation:
    """One agency subscribed to an event type, as the informant is told about it."""

    agency: str
    legal_basis: Literal["statutory", "consent"]
    statute: str | None
    condition: Condition = field(default_factory=Condition)

    @property
    def name(self) -> str:
        return agency_name(self.agency)

    @property
    def statutory(self) -> bool:
        return self.legal_basis == "statutory"

    def concerned_with(self, event_type: str, postcodes: frozenset[str]) -> bool:
        """Whether its subscription's condition (a council's local authority) holds for these
        addresses; the same rule the router applies, to the authorities intake will record."""
        authorities = [local_authority(postcode) for postcode in postcodes]
        return self.condition.holds_for(
            RoutableEvent(
                "",
                event_type,
                "",
                postcodes=postcodes,
                local_authorities=frozenset(code for code in authorities if code is not None),
                area_unknown=None in authorities,
            )
        )


async def organisations_to_tell(
    pool: asyncpg.Pool, event_type: str, postcodes: frozenset[str] | None = None
) -> list[Organisation]:
    """The active, currently valid subscriptions for this event type, statutory first;
    with ``postcodes``, only those whose condition holds for those addresses. A
    subscription only about the people its agency registered (DWP's for pensioners'
    moves) is not listed: the desk cannot know whether the agency holds the person's
    record, and the person can choose online if it does (``citizens.data_tracker``)."""
    rows = await pool.fetch(
        "SELECT agency, legal_basis, statute, condition::text AS condition FROM subscription"
        " WHERE event_type = $1 AND status = 'active'"
        "   AND (valid_from IS NULL OR valid_from <= now()) AND (valid_to IS NULL OR valid_to > now())",
        event_type,
    )
    organisations = [
        Organisation(
            agency=r["agency"],
            legal_basis=r["legal_basis"],
            statute=r["statute"],
            condition=Condition.from_json(json.loads(r["condition"]) if r["condition"] else None),
        )
        for r in rows
    ]
    organisations = [o for o in organisations if not o.condition.registered_subjects]
    if postcodes is not None:
        organisations = [o for o in organisations if o.concerned_with(event_type, postcodes)]
    return sorted(organisations, key=lambda o: (not o.statutory, o.name))


Colour = Literal["green", "blue", "grey", "red", "yellow", "orange"]


@dataclass(frozen=True)
class AgencyStatus:
    agency: str
    name: str
    status: str
    colour: Colour
    detail: str
    settled: bool  # nothing more will happen without someone acting


def agency_statuses(status: dict[str, Any]) -> list[AgencyStatus]:
    """Each agency's decision and latest receipt for an event (``store.event_status``), in words.

    Agencies whose subscriptions do not cover the event (another event type, or
    a council for another area) are left out: they were never going to be told,
    and a registrar does not need a row for every council in the country.
    """
    return sorted(
        (
            _in_words(row["agency"], row["decision"], row["receipt"], overdue=row.get("overdue", False))
            for row in status["agencies"]
            if row["decision"] != "withheld_no_subscription"
        ),
        key=lambda s: s.name,
    )


def _in_words(
    agency: str, decision: str, receipt: dict[str, Any] | None, *, overdue: bool = False
) -> AgencyStatus:
    name = agency_name(agency)
    if decision == "delivered":
        outcome = receipt["outcome"] if receipt else None
        if outcome == "applied":
            return AgencyStatus(agency, name, "Done", "green", "They have updated their records.", True)
        if outcome == "rejected":
            reason = receipt["reason"] if receipt and receipt["reason"] else "no reason given"
            return AgencyStatus(agency, name, "Rejected", "red", f"They could not use it: {reason}.", True)
        if overdue:
            return AgencyStatus(
                agency,
                name,
                "Overdue",
                "orange",
                "They have not confirmed in time. It is flagged for the operators, who can send it again.",
                False,
            )
        if outcome == "received":
            return AgencyStatus(
                agency, name, "Received", "blue", "They have it and are dealing with it.", False
            )
        return AgencyStatus(agency, name, "Sent", "blue", "Waiting for them to confirm they have it.", False)
    if decision == "withheld_no_consent":
        return AgencyStatus(
            agency, name, "Not told", "grey", "The informant did not agree to tell them.", True
        )
    if decision == "blocked":
        return AgencyStatus(agency, name, "Not told", "grey", "The law does not allow telling them.", True)
    if decision == "withheld_not_of_interest":
        return AgencyStatus(
            agency, name, "Not told", "grey", "They hear only about people they hold records for.", True
        )
    if decision == "withheld_area_unknown":
        return AgencyStatus(
            agency,
            name,
            "Not told",
            "yellow",
            "The postcode is not in the postcode directory, so we could not tell which council it is in."
            " Check the postcode, and correct it if it is wrong.",
            True,
        )
    return AgencyStatus(agency, name, "Not told", "yellow", "Ask the service desk why.", True)
