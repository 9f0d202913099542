"""What a citizen may see about themselves: who may be told what (their consent
settings), every change to those choices, and, for each of their events, which
agencies were told, which fields, on what legal basis, and what each agency did
with it. Each function takes the subject and, for a proxy, the agencies their
appointment covers (``None``: every agency), and answers in plain English as well
as in the stored values.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import asyncpg

from router.organisations import agency_name
from router.rules import Condition
from router.store import event_status, registered_interest
from runtime.web.i18n import N_
from runtime.web.i18n import gettext as _

EVENT_NAMES = {
    "BirthRegistered": "Birth registrations",
    "DeathRegistered": "Death registrations",
    "AddressChanged": "Changes of address",
    "EventCorrected": "Corrections to a registration",
    "EventVoided": "Cancelled registrations",
    "ServicesRequested": "Requests to tell more organisations",
}
EVENT_TITLES = {
    "BirthRegistered": "Birth registered",
    "DeathRegistered": "Death registered",
    "AddressChanged": "Change of address",
    "EventCorrected": "Registration corrected",
    "EventVoided": "Registration cancelled",
    "ServicesRequested": "More organisations asked to be told",
}
CHOICE_WORDS = {
    "given": "Yes, they may be told",
    "refused": "No, they may not be told",
    "withdrawn": "No, consent withdrawn",
    None: "Not asked yet",
}
RECORDED_BY_WORDS = {
    "informant": "The informant, at the register office",
    "citizen": "You, online",
    "proxy": "Someone appointed to act for you, online",
}
FIELD_WORDS = {
    "nino": N_("National Insurance number"),
    "deceased": N_("name and date of birth of the person who died"),
    "child": N_("the child's details"),
    "parents": N_("the parents' details"),
    "person": N_("name and date of birth"),
    "date_of_death": N_("date of death"),
    "place_of_death": N_("place of death"),
    "last_address": N_("last address"),
    "home_address": N_("home address"),
    "new_address": N_("new address"),
    "old_address": N_("previous address"),
    "effective_date": N_("date of the move"),
    "moving_with": N_("who moved too"),
    "surviving_partner": N_("surviving partner"),
    "executor": N_("executor"),
    "next_of_kin": N_("next of kin"),
    "informant.name": N_("name of the person who gave the information"),
    "informant.relationship": N_("how the person who gave the information is related"),
    "recorded_by": N_("who recorded it"),
    "requested_event_type": N_("what kind of registration it follows"),
    "requests_event_id": N_("which registration it follows"),
    "requests_reference": N_("the registration's reference"),
    "address": N_("address"),
    "driving_licence_number": N_("driving licence number"),
    "passport_number": N_("passport number"),
    "blue_badge_number": N_("Blue Badge number"),
    # Derived facts (schemas/derived.py): what is told instead of the value itself.
    "deceased_age_band": N_("age band at death (not the date of birth)"),
    "deceased_over_18": N_("whether the person who died was 18 or over"),
    "last_address_local_authority": N_("council area of the last address (not the address)"),
}
# The parts of a related person (``surviving_partner.nino``), see schemas/fieldpaths.py.
PART_WORDS = {
    "person": N_("name and date of birth"),
    "relationship": N_("relationship"),
    "nino": N_("National Insurance number"),
    "address": N_("address"),
}


def event_name(event_type: str) -> str:
    return EVENT_NAMES.get(event_type, event_type)


def field_words(fields: list[str]) -> list[str]:
    return [_field_word(name) for name in sorted(fields)]


def _field_word(path: str) -> str:
    if path in FIELD_WORDS:
        return _(FIELD_WORDS[path])
    field, _dot, part = path.partition(".")
    if part in PART_WORDS:
        return f"{_field_word(field)}: {_(PART_WORDS[part])}"
    return path.replace("_", " ").replace(".", ": ")


@dataclass(frozen=True)
class ConsentSetting:
    """One agency's subscription to one event type, and this person's current choice about it."""

    agency: str
    agency_name: str
    event_type: str
    event_name: str
    legal_basis: str  # statutory | consent
    statute: str | None
    choice: str | None  # given | refused | withdrawn; None: never asked
    choice_words: str
    recorded_by: str | None
    recorded_at: datetime | None
    fields: list[str] | None  # what the agency is told, in words (field_words); None: everything

    @property
    def changeable(self) -> bool:
        return self.legal_basis == "consent"


async def consent_settings(
    pool: asyncpg.Pool, subject_id: str, agencies: frozenset[str] | None
) -> list[ConsentSetting]:
    """Every active subscription in force (within ``agencies``) that concerns the subject, with
    their current choice. A council's concerns them when one of their addresses is in its
    local authority (``local_authorities_of``), or when they made a choice about it before
    (so that they can always withdraw it); the other councils are not theirs to choose. A
    subscription only about the people an agency registered (DWP's for pensioners' moves)
    concerns only those it registered."""
    theirs = await local_authorities_of(pool, subject_id)
    # A subscription only about the people an agency registered: theirs only if it registered them.
    registered_by = (await registered_interest(pool, [subject_id])).get(subject_id, frozenset())
    rows = await pool.fetch(
        "SELECT s.agency, s.event_type, s.legal_basis, s.statute, s.fields,"
        "       c.choice, c.recorded_by, c.recorded_at, s.condition::text AS condition"
        "  FROM subscription s"
        "  LEFT JOIN current_consent c"
        "    ON c.subject_id = $1 AND c.agency = s.agency AND c.event_type = s.event_type"
        " WHERE s.status = 'active'"
        "   AND (s.valid_from IS NULL OR s.valid_from <= now())"
        "   AND (s.valid_to IS NULL OR s.valid_to > now())"
        "   AND ($2::text[] IS NULL OR s.agency = ANY($2::text[]))",
        subject_id,
        None if agencies is None else sorted(agencies),
    )
    settings = [
        ConsentSetting(
            agency=r["agency"],
            agency_name=agency_name(r["agency"]),
            event_type=r["event_type"],
            event_name=event_name(r["event_type"]),
            legal_basis=r["legal_basis"],
            statute=r["statute"],
            choice=r["choice"],
            choice_words=CHOICE_WORDS.get(r["choice"], str(r["choice"])),
            recorded_by=r["recorded_by"],
            recorded_at=r["recorded_at"],
            fields=None if r["fields"] is None else field_words(list(r["fields"])),
        )
        for r in rows
        if r["choice"] is not None or _concerns(r["agency"], r["condition"], theirs, registered_by)
    ]
    return sorted(settings, key=lambda s: (s.event_name, s.legal_basis != "statutory", s.agency_name))


def _concerns(
    agency: str, condition: str | None, theirs: frozenset[str], registered_by: frozenset[str]
) -> bool:
    parsed = Condition.from_json(json.loads(condition) if condition else None)
    return parsed.concerns(theirs) and (not parsed.registered_subjects or agency in registered_by)


async def local_authorities_of(pool: asyncpg.Pool, subject_id: str) -> frozenset[str]:
    """The local authorities (GSS codes) the subject lives or lived in, as intake recorded
    them: for each of their registrations not voided, the latest of its own and its
    corrections' (a corrected postcode may move it to another council); old and new for a move."""
    rows = await pool.fetch(
        "SELECT DISTINCT ON (coalesce(i.follows_event_id, i.event_id)) i.local_authorities"
        "  FROM intake_record i"
        " WHERE i.subject_id = $1 AND i.local_authorities IS NOT NULL"
        "   AND NOT EXISTS (SELECT 1 FROM intake_record v"
        "                    WHERE v.event_type = 'EventVoided'"
        "                      AND v.follows_event_id = coalesce(i.follows_event_id, i.event_id))"
        " ORDER BY coalesce(i.follows_event_id, i.event_id), i.recorded_at DESC",
        subject_id,
    )
    return frozenset(code for r in rows for code in r["local_authorities"])


async def consent_setting(
    pool: asyncpg.Pool, subject_id: str, agency: str, event_type: str
) -> ConsentSetting | None:
    found = [
        s for s in await consent_settings(pool, subject_id, frozenset({agency})) if s.event_type == event_type
    ]
    return found[0] if found else None


@dataclass(frozen=True)
class ConsentChange:
    agency: str
    agency_name: str
    event_type: str
    event_name: str
    choice: str
    choice_words: str
    recorded_by: str
    recorded_by_words: str
    recorded_at: datetime
    # Telling the agency of a withdrawal: not_needed (nothing to withdraw, e.g. consent
    # given), checking (not yet routed), not_held (it was sent nothing under this
    # consent) or told; then the agency's receipt (received, applied, rejected).
    agency_notice: str
    agency_told_at: datetime | None
    agency_receipt: str | None
    agency_receipt_reason: str | None
    agency_notice_words: str


def _notice(change_id: Any, told: bool | None) -> str:
    if change_id is None:
        return "not_needed"
    if told is None:
        return "checking"
    return "told" if told else "not_held"


def _notice_words(notice: str, name: str, receipt: str | None, reason: str | None) -> str:
    if notice == "not_needed":
        return ""
    if notice == "checking":
        return f"We are checking whether {name} holds any of your information under this consent."
    if notice == "not_held":
        return (
            f"{name} had not been sent any of this information with your consent, "
            "so there was nothing to tell them."
        )
    if receipt == "applied":
        return f"{name} was told, and confirmed they have stopped using it."
    if receipt == "rejected":
        return f"{name} was told, but could not act on it: {reason or 'they gave no reason'}."
    if receipt == "received":
        return f"{name} was told, and confirmed they have the message and are dealing with it."
    return f"{name} was told. Waiting for them to confirm."


async def consent_history(
    pool: asyncpg.Pool, subject_id: str, agencies: frozenset[str] | None
) -> list[ConsentChange]:
    """Every consent choice recorded for the subject (within ``agencies``), newest first."""
    rows = await pool.fetch(
        "SELECT c.agency, c.event_type, c.choice, c.recorded_by, c.recorded_at, c.change_id,"
        "       n.told, n.decided_at AS told_at, r.outcome AS receipt, r.reason AS receipt_reason"
        "  FROM consent_record c"
        "  LEFT JOIN consent_notice n ON n.change_id = c.change_id AND n.agency = c.agency"
        # The agency's latest word: a final receipt (applied, rejected) over a received one.
        "  LEFT JOIN LATERAL (SELECT outcome, reason FROM delivery_receipt d"
        "                      WHERE n.told AND d.event_id = c.change_id AND d.agency = c.agency"
        "                      ORDER BY d.outcome = 'RECEIVED', d.issued_at DESC LIMIT 1) r ON true"
        " WHERE c.subject_id = $1 AND ($2::text[] IS NULL OR c.agency = ANY($2::text[]))"
        " ORDER BY c.id DESC",
        subject_id,
        None if agencies is None else sorted(agencies),
    )
    return [_change(r) for r in rows]


def _change(r: asyncpg.Record) -> ConsentChange:
    notice = _notice(r["change_id"], r["told"])
    receipt = None if r["receipt"] is None else str(r["receipt"]).lower()
    return ConsentChange(
        agency=r["agency"],
        agency_name=agency_name(r["agency"]),
        event_type=r["event_type"],
        event_name=event_name(r["event_type"]),
        choice=r["choice"],
        choice_words=CHOICE_WORDS.get(r["choice"], r["choice"]),
        recorded_by=r["recorded_by"],
        recorded_by_words=RECORDED_BY_WORDS.get(r["recorded_by"], r["recorded_by"]),
        recorded_at=r["recorded_at"],
        agency_notice=notice,
        agency_told_at=r["told_at"] if notice == "told" else None,
        agency_receipt=receipt,
        agency_receipt_reason=r["receipt_reason"],
        agency_notice_words=_notice_words(notice, agency_name(r["agency"]), receipt, r["receipt_reason"]),
    )


@dataclass(frozen=True)
class Delivery:
    """What happened between one event and one agency, in the citizen's words."""

    agency: str
    agency_name: str
    # delivered | withheld_no_consent | withheld_no_subscription | withheld_area_unknown
    # | withheld_not_of_interest | blocked
    decision: str
    told: bool
    why: str
    legal_basis: str | None
    legal_basis_words: str
    decided_at: str
    fields_shared: list[str]
    fields_not_shared: list[str]
    receipt: str | None  # received | applied | rejected
    receipt_reason: str | None
    overdue: bool
    receipt_words: str


@dataclass(frozen=True)
class ReportedEvent:
    event_type: str
    title: str
    recorded_at: str
    deliveries: list[Delivery]


def _legal_basis_words(basis: str | None) -> str:
    if basis is None:
        return "None"
    if basis.startswith("statutory: "):
        return "Required by law: " + basis.removeprefix("statutory: ")
    if basis == "consent":
        return "Your consent"
    if basis.startswith("policy"):
        return "A rule that forbids sharing this"
    return basis


WHY_WORDS = {
    "delivered": N_("They were told."),
    "withheld_no_consent": N_("Not told: they may only be told with consent, and consent was not given."),
    "withheld_no_subscription": N_("Not told: they do not receive this kind of information."),
    "withheld_area_unknown": N_("Not told: we could not work out which council the address is in."),
    "withheld_not_of_interest": N_(
        "Not told: they hear only about people they hold records for, and you are not one."
    ),
    "blocked": N_("Not told: the rules forbid sharing this with them, whatever anyone agrees."),
}


def _why(decision: str) -> str:
    return _(WHY_WORDS.get(decision, N_("Not told.")))


def _receipt_words(decision: str, receipt: dict[str, Any] | None, overdue: bool) -> str:
    if decision != "delivered":
        return _("Nothing was sent, so there is nothing to confirm.")
    outcome = receipt["outcome"] if receipt else None
    if outcome == "applied":
        return _("They confirmed they have updated their records.")
    if outcome == "rejected":  # the agency's reason is in its own words
        reason = receipt["reason"] if receipt and receipt["reason"] else _("they gave no reason")
        return _("They could not use it: %(reason)s.") % {"reason": reason}
    if overdue:
        return _("They have not confirmed in time; our operators have been alerted.")
    if outcome == "received":
        return _("They confirmed they have it and are dealing with it.")
    return _("Waiting for them to confirm they have it.")


def delivery(row: dict[str, Any]) -> Delivery:
    """One agency's row of ``router.store.event_status``, in the citizen's words."""
    receipt = row["receipt"]
    return Delivery(
        agency=row["agency"],
        agency_name=agency_name(row["agency"]),
        decision=row["decision"],
        told=row["decision"] == "delivered",
        why=_why(row["decision"]),
        legal_basis=row["legal_basis"],
        legal_basis_words=_legal_basis_words(row["legal_basis"] if row["decision"] == "delivered" else None),
        decided_at=row["decided_at"],
        fields_shared=field_words(row["fields_delivered"]),
        fields_not_shared=field_words(row["fields_withheld"]),
        receipt=None if receipt is None else receipt["outcome"],
        receipt_reason=None if receipt is None else receipt["reason"],
        overdue=bool(row["overdue"]),
        receipt_words=_receipt_words(row["decision"], receipt, bool(row["overdue"])),
    )


async def received(
    pool: asyncpg.Pool, subject_id: str, agencies: frozenset[str] | None
) -> list[ReportedEvent]:
    """The subject's events, newest first, each with what every agency (within ``agencies``) got.

    A registration whose NINO was corrected (``subject_link``), with its corrections
    and voids, is the new NINO's holder's from then on, and no longer the old one's:
    the old NINO may be someone else's, who must not see this person's events, just as
    this person sees none of the other events recorded under the old NINO."""
    references = await pool.fetch(
        "WITH moved_here AS (SELECT corrected_event_id FROM subject_link WHERE new_subject_id = $1),"
        " candidate AS ("
        "  SELECT reference, event_id, follows_event_id, subject_id, recorded_at"
        "    FROM intake_record WHERE subject_id = $1"
        "  UNION SELECT i.reference, i.event_id, i.follows_event_id, i.subject_id, i.recorded_at"
        "    FROM intake_record i JOIN moved_here m ON i.event_id = m.corrected_event_id"
        "  UNION SELECT i.reference, i.event_id, i.follows_event_id, i.subject_id, i.recorded_at"
        "    FROM intake_record i JOIN moved_here m ON i.follows_event_id = m.corrected_event_id"
        ")"
        " SELECT c.reference FROM candidate c"
        "   LEFT JOIN LATERAL (SELECT new_subject_id FROM subject_link l"
        "                       WHERE l.corrected_event_id = COALESCE(c.follows_event_id, c.event_id)"
        "                       ORDER BY l.id DESC LIMIT 1) latest ON true"
        "  WHERE COALESCE(latest.new_subject_id, c.subject_id) = $1"  # whose it is now
        "  ORDER BY c.recorded_at DESC, c.reference",
        subject_id,
    )
    events = []
    for ref in references:
        status = await event_status(pool, ref["reference"])
        if status is None:  # cannot happen: the row was just read, and intake rows are never deleted
            continue
        deliveries = sorted(
            (delivery(row) for row in status["agencies"] if agencies is None or row["agency"] in agencies),
            key=lambda d: (not d.told, d.agency_name),
        )
        if agencies is not None and not deliveries:
            continue  # a proxy for some agencies learns nothing of events outside them
        events.append(
            ReportedEvent(
                event_type=status["event_type"],
                title=EVENT_TITLES.get(status["event_type"], status["event_type"]),
                recorded_at=status["recorded_at"],
                deliveries=deliveries,
            )
        )
    return events


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


async def everything(pool: asyncpg.Pool, subject_id: str, agencies: frozenset[str] | None) -> dict[str, Any]:
    """Consents, their history and the events with their deliveries, as JSON-ready data."""
    return {
        "subject_id": subject_id,
        "agencies_covered": "all" if agencies is None else sorted(agencies),
        "consents": [
            _plain({**asdict(s), "changeable": s.changeable})
            for s in await consent_settings(pool, subject_id, agencies)
        ],
        "consent_history": [_plain(asdict(c)) for c in await consent_history(pool, subject_id, agencies)],
        "events": [_plain(asdict(e)) for e in await received(pool, subject_id, agencies)],
    }
