"""The reference agencies against the real database: HMRC, DWP, DVLA and the
councils apply deaths and moves to their own records, reject what they cannot
match with a reason free of personal data, and apply each event once.

Each event is what the agency would really receive: built from an intake
submission as intake builds it, minimised to the agency's seed subscription,
and passed through the Avro codec."""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import pytest

from consumers.agencies import COUNCIL_AUTHORITIES, council, handler_for, licensing, pensions, records, tax
from consumers.agencies.council import CouncilHandler
from consumers.agencies.records import Resident
from consumers.reference import apply_life_event
from consumers.sdk import BatchHandler, DeliveredEvent, Receipt, apply_batch, handle_once
from devstack.demo import demo_submissions, seed_agency_records
from producers.requests import AddressChange, BirthRegistration, DeathRegistration, Submission
from router.minimise import minimise
from router.seed import read_seed
from schemas import decode, encode, models
from schemas.catalogue import DISCLOSURE_SUFFIX
from schemas.validation import today_in_the_uk
from tests.support import TEST_OFFICE, death_registration, random_nino

pytestmark = pytest.mark.integration

GRANTED = {(s["agency"], s["event_type"]): frozenset(s["fields"]) for s in read_seed()}
SUBMISSIONS: dict[str, type[Submission]] = {
    kind.event_type: kind for kind in (DeathRegistration, BirthRegistration, AddressChange)
}
DIED_ON = date(2025, 11, 18)
MOVED_ON = date(2025, 10, 1)
BORN = date(1941, 3, 2)


# --- building what an agency receives ---------------------------------------------------------


@dataclass(frozen=True)
class Someone:
    """A fictional person with their own names, NINO and address, so tests do not meet."""

    given_names: str
    family_name: str
    date_of_birth: date | None
    nino: str
    address: dict[str, Any]

    def person(self) -> models.Person:
        return models.Person(
            given_names=self.given_names, family_name=self.family_name, date_of_birth=self.date_of_birth
        )

    def home(self) -> models.Address:
        return models.Address(**self.address)

    def as_submitted(self) -> dict[str, Any]:
        born = None if self.date_of_birth is None else self.date_of_birth.isoformat()
        return {
            "given_names": self.given_names,
            "family_name": self.family_name,
            "date_of_birth": born,
            "nino": self.nino,
        }


def _letters(n: int) -> str:
    return "".join(random.choice(string.ascii_lowercase) for _ in range(n)).capitalize()


def an_address(postcode: str = "LS1 1AA", *, uprn: bool = True) -> dict[str, Any]:
    return {
        "lines": [f"{random.randint(1, 999)} {_letters(8)} Street"],
        "town": "Leeds" if postcode.startswith("LS") else "Bradford",
        "postcode": postcode,
        "uprn": str(random.randint(10**9, 10**12 - 1)) if uprn else None,
    }


def someone(
    postcode: str = "LS1 1AA", *, born: date | None = BORN, given_names: str = "Pat", uprn: bool = True
) -> Someone:
    return Someone(given_names, _letters(8), born, random_nino(), an_address(postcode, uprn=uprn))


def death_of(who: Someone, died_on: date = DIED_ON, **overrides: Any) -> dict[str, Any]:
    return death_registration(
        deceased=who.as_submitted(), date_of_death=died_on.isoformat(), last_address=who.address, **overrides
    )


def move_of(
    who: Someone, new_address: dict[str, Any], moving_with: Iterable[Someone] = (), **overrides: Any
) -> dict[str, Any]:
    body = {
        "informant": {"name": "Jo Citizen", "relationship": "self"},
        "channel": "online",
        "person": who.as_submitted(),
        "old_address": who.address,
        "new_address": new_address,
        "effective_date": MOVED_ON.isoformat(),
        "moving_with": [
            {
                "given_names": m.given_names,
                "family_name": m.family_name,
                "date_of_birth": None if m.date_of_birth is None else m.date_of_birth.isoformat(),
                "relationship": "child",
            }
            for m in moving_with
        ],
    }
    return body | overrides


def birth() -> dict[str, Any]:
    return {
        "informant": {"name": "Sam Sample", "relationship": "mother"},
        "channel": "desk",
        "child": {"given_names": "Robin", "family_name": _letters(8), "date_of_birth": "2025-11-11"},
        "place_of_birth": "St James's Hospital, Leeds",
        "registration_district": "Leeds",
        "parents": [{"given_names": "Sam", "family_name": "Sample", "relationship": "mother"}],
        "home_address": an_address(),
    }


def delivered(
    agency: str, event_type: str, body: dict[str, Any], *, withhold: Iterable[str] = ()
) -> DeliveredEvent:
    """What ``agency`` receives of the event intake records for ``body``."""
    submission = SUBMISSIONS[event_type].model_validate(body)
    envelope = models.Envelope(
        event_id=uuid.uuid4(),
        reference="TUO-2026-TEST-0001",
        occurred_at=submission.occurred_at(),
        recorded_at=datetime.now(UTC),
        subject=models.SubjectIdentifiers(subject_id=f"s-{uuid.uuid4().hex}", nino=submission.subject().nino),
        informant=models.Informant(**submission.informant.model_dump()),
        channel=submission.channel.upper(),
        registration_office=TEST_OFFICE,
        provenance=models.Provenance(source_system="tuo-intake", recorded_by="registrar-1"),
    )
    event = submission.contract(envelope).avro()
    granted = GRANTED[(agency, event_type)] - set(withhold)
    _, record = decode(encode(f"{event_type}{DISCLOSURE_SUFFIX}", minimise(event_type, event, granted)))
    return DeliveredEvent(event_id=str(envelope.event_id), event_type=event_type, record=record)


def void_of(original: DeliveredEvent) -> DeliveredEvent:
    """The void of an earlier event, as the agency receives it."""
    event_id = uuid.uuid4()
    record = {
        "envelope": {**original.record["envelope"], "event_id": event_id, "recorded_at": datetime.now(UTC)},
        "voids_event_id": original.event_id,
        "voids_reference": original.record["envelope"]["reference"],
        "voided_event_type": original.event_type,
        "reason": "Registered in error",
        "withheld_fields": [],
    }
    _, decoded = decode(encode("EventVoidedDisclosure", record))
    return DeliveredEvent(event_id=str(event_id), event_type="EventVoided", record=decoded)


async def apply(pool: asyncpg.Pool, agency: str, event: DeliveredEvent) -> Receipt:
    return await handle_once(pool, agency, event, handler_for(agency))


# --- checking a rejection ---------------------------------------------------------------------

PERSONAL = {"given_names", "family_name", "nino", "lines", "town", "postcode", "uprn"}
PERSONAL_DATES = {"date_of_birth", "date_of_death", "effective_date"}


def _personal_values(value: Any, key: str | None = None) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _personal_values(v, k)
    elif isinstance(value, list):
        for item in value:
            yield from _personal_values(item, key)
    elif isinstance(value, str) and key in PERSONAL:
        yield value
        yield from (word for word in value.split() if len(word) > 3)


def assert_rejected_without_personal_data(receipt: Receipt, body: dict[str, Any]) -> str:
    assert receipt.outcome == "REJECTED"
    reason = receipt.reason or ""
    assert reason, "a rejection says why"
    assert not any(ch.isdigit() for ch in reason), f"no dates, NINOs or numbers in {reason!r}"
    leaked = [v for v in _personal_values(body) if v.upper() in reason.upper()]
    assert not leaked, f"{reason!r} quotes {leaked}"
    return reason


# --- hmrc: tax records ------------------------------------------------------------------------


async def _tax_record(pool: asyncpg.Pool, nino: str) -> asyncpg.Record:
    return await pool.fetchrow("SELECT * FROM agency.tax_record WHERE nino = $1", nino)


async def test_tax_record_closes_on_the_date_of_death_not_the_day_it_is_told(pool: asyncpg.Pool) -> None:
    pat = someone()
    await records.open_tax_record(pool, pat.nino, pat.person(), pat.home())

    receipt = await apply(pool, "hmrc", delivered("hmrc", "DeathRegistered", death_of(pat)))

    assert receipt.outcome == "APPLIED"
    record = await _tax_record(pool, pat.nino)
    assert (record["status"], record["closed_on"]) == ("closed", DIED_ON)


async def test_a_death_for_a_tax_record_already_closed_is_applied_without_change(pool: asyncpg.Pool) -> None:
    pat = someone()
    await records.open_tax_record(pool, pat.nino, pat.person(), pat.home())
    await apply(pool, "hmrc", delivered("hmrc", "DeathRegistered", death_of(pat)))

    registered_again = delivered("hmrc", "DeathRegistered", death_of(pat, DIED_ON + timedelta(days=1)))
    receipt = await apply(pool, "hmrc", registered_again)

    assert receipt.outcome == "APPLIED"
    assert (await _tax_record(pool, pat.nino))["closed_on"] == DIED_ON


async def test_tax_record_takes_the_new_address_from_a_change_of_address(pool: asyncpg.Pool) -> None:
    jo = someone(born=None)
    await records.open_tax_record(pool, jo.nino, jo.person(), jo.home())
    new_address = an_address("LS6 2AB")

    receipt = await apply(pool, "hmrc", delivered("hmrc", "AddressChanged", move_of(jo, new_address)))

    assert receipt.outcome == "APPLIED"
    record = await _tax_record(pool, jo.nino)
    assert (list(record["address_lines"]), record["postcode"], record["uprn"]) == (
        new_address["lines"],
        "LS6 2AB",
        new_address["uprn"],
    )
    assert record["address_from"] == MOVED_ON


async def test_an_older_change_of_address_arriving_late_does_not_overwrite_a_newer_one(
    pool: asyncpg.Pool,
) -> None:
    jo = someone(born=None)
    await records.open_tax_record(pool, jo.nino, jo.person(), jo.home())
    newer, older = an_address("LS6 2AB"), an_address("LS7 3AB")
    await apply(pool, "hmrc", delivered("hmrc", "AddressChanged", move_of(jo, newer)))

    earlier_move = move_of(jo, older, effective_date=(MOVED_ON - timedelta(days=30)).isoformat())
    receipt = await apply(pool, "hmrc", delivered("hmrc", "AddressChanged", earlier_move))

    assert receipt.outcome == "APPLIED"
    assert (await _tax_record(pool, jo.nino))["postcode"] == "LS6 2AB"


async def test_death_without_a_tax_record_is_rejected_with_a_reason_free_of_personal_data(
    pool: asyncpg.Pool,
) -> None:
    body = death_of(someone())

    receipt = await apply(pool, "hmrc", delivered("hmrc", "DeathRegistered", body))

    reason = assert_rejected_without_personal_data(receipt, body)
    assert reason == "no tax record for this National Insurance number"


async def test_tax_rejects_a_death_whose_national_insurance_number_was_withheld(pool: asyncpg.Pool) -> None:
    pat = someone()
    await records.open_tax_record(pool, pat.nino, pat.person(), pat.home())
    body = death_of(pat)

    receipt = await apply(pool, "hmrc", delivered("hmrc", "DeathRegistered", body, withhold={"nino"}))

    assert assert_rejected_without_personal_data(receipt, body) == (
        "the National Insurance number was not delivered"
    )
    assert (await _tax_record(pool, pat.nino))["status"] == "open"


async def test_voiding_a_death_reopens_the_tax_record_it_closed(pool: asyncpg.Pool) -> None:
    pat = someone()
    await records.open_tax_record(pool, pat.nino, pat.person(), pat.home())
    death = delivered("hmrc", "DeathRegistered", death_of(pat))
    await apply(pool, "hmrc", death)

    receipt = await apply(pool, "hmrc", void_of(death))

    assert receipt.outcome == "APPLIED"
    record = await _tax_record(pool, pat.nino)
    assert (record["status"], record["closed_on"]) == ("open", None)


async def test_a_redelivered_death_keeps_its_first_outcome_and_is_not_applied_again(
    pool: asyncpg.Pool,
) -> None:
    pat = someone()
    death = delivered("hmrc", "DeathRegistered", death_of(pat))
    rejected = await apply(pool, "hmrc", death)
    await records.open_tax_record(pool, pat.nino, pat.person(), pat.home())

    again = await apply(pool, "hmrc", death)

    assert (again.outcome, again.reason) == (rejected.outcome, rejected.reason)
    assert (await _tax_record(pool, pat.nino))["status"] == "open", "the second copy was not applied"


async def test_a_redelivered_death_does_not_close_a_record_reopened_since(pool: asyncpg.Pool) -> None:
    pat = someone()
    await records.open_tax_record(pool, pat.nino, pat.person(), pat.home())
    death = delivered("hmrc", "DeathRegistered", death_of(pat))
    first = await apply(pool, "hmrc", death)
    await apply(pool, "hmrc", void_of(death))

    again = await apply(pool, "hmrc", death)

    assert (first.outcome, again.outcome) == ("APPLIED", "APPLIED")
    assert (await _tax_record(pool, pat.nino))["status"] == "open"


# --- dwp: pension awards ----------------------------------------------------------------------


async def _award(pool: asyncpg.Pool, nino: str) -> asyncpg.Record:
    return await pool.fetchrow("SELECT * FROM agency.pension_award WHERE nino = $1", nino)


async def test_pension_stops_on_death_and_overpayment_counts_days_paid_after_it(pool: asyncpg.Pool) -> None:
    pat = someone()
    # £221.10 a week, paid up to ten days after the death: 22110 × 10 / 7 = 31585.71…,
    # rounded down to the penny.
    await records.award_pension(pool, pat.nino, 22110, DIED_ON + timedelta(days=10))

    receipt = await apply(pool, "dwp", delivered("dwp", "DeathRegistered", death_of(pat)))

    assert receipt.outcome == "APPLIED"
    award = await _award(pool, pat.nino)
    assert (award["status"], award["stopped_on"], award["overpayment_pence"]) == ("stopped", DIED_ON, 31585)


async def test_no_overpayment_when_payments_ended_before_the_death(pool: asyncpg.Pool) -> None:
    pat = someone()
    await records.award_pension(pool, pat.nino, 22110, DIED_ON - timedelta(days=3))

    await apply(pool, "dwp", delivered("dwp", "DeathRegistered", death_of(pat)))

    award = await _award(pool, pat.nino)
    assert (award["status"], award["overpayment_pence"]) == ("stopped", 0)


async def test_voiding_a_death_puts_the_pension_back_in_payment(pool: asyncpg.Pool) -> None:
    pat = someone()
    await records.award_pension(pool, pat.nino, 22110, DIED_ON + timedelta(days=10))
    death = delivered("dwp", "DeathRegistered", death_of(pat))
    await apply(pool, "dwp", death)

    await apply(pool, "dwp", void_of(death))

    award = await _award(pool, pat.nino)
    assert (award["status"], award["stopped_on"], award["overpayment_pence"]) == ("in_payment", None, 0)


async def test_death_without_a_pension_award_is_rejected_with_a_reason_free_of_personal_data(
    pool: asyncpg.Pool,
) -> None:
    body = death_of(someone())

    receipt = await apply(pool, "dwp", delivered("dwp", "DeathRegistered", body))

    assert assert_rejected_without_personal_data(receipt, body) == (
        "no pension award for this National Insurance number"
    )


async def test_a_birth_is_applied_at_dwp_without_effect(pool: asyncpg.Pool) -> None:
    awards_before = await pool.fetchval("SELECT count(*) FROM agency.pension_award")

    receipt = await apply(pool, "dwp", delivered("dwp", "BirthRegistered", birth()))

    assert receipt.outcome == "APPLIED"
    assert await pool.fetchval("SELECT count(*) FROM agency.pension_award") == awards_before


# --- a batch set-wise, as each event in turn -----------------------------------------------------


async def _give_record(pool: asyncpg.Pool, agency: str, person: Someone) -> None:
    if agency == "dwp":
        await records.award_pension(pool, person.nino, 22110, DIED_ON + timedelta(days=10))
    else:
        await records.open_tax_record(pool, person.nino, person.person(), person.home())


async def _state(pool: asyncpg.Pool, agency: str, people: list[Someone]) -> list[tuple[Any, ...]]:
    if agency == "dwp":
        awards = [await _award(pool, p.nino) for p in people]
        return [(r["status"], r["stopped_on"], r["overpayment_pence"]) for r in awards]
    taxed = [await _tax_record(pool, p.nino) for p in people]
    return [(r["status"], r["closed_on"], r["postcode"]) for r in taxed]


async def _deaths_batch(pool: asyncpg.Pool, agency: str) -> tuple[list[DeliveredEvent], list[Someone]]:
    """Every path a batch can take at an agency applying deaths set-wise, for new people:
    two deaths, a death without a record, one whose NINO was withheld, a void of the
    first, a second registration of one death, another event between deaths, and one
    more death. Returns the events, in order, and the people with records."""
    pat, sam, nobody, twice, last = (someone() for _ in range(5))
    for person in (pat, sam, twice, last):
        await _give_record(pool, agency, person)
    death = delivered(agency, "DeathRegistered", death_of(pat))
    between = (
        delivered(agency, "BirthRegistered", birth())
        if agency == "dwp"
        else delivered(agency, "AddressChanged", move_of(last, an_address("LS2 7EW")))
    )
    events = [
        death,
        delivered(agency, "DeathRegistered", death_of(sam)),
        delivered(agency, "DeathRegistered", death_of(nobody)),
        delivered(agency, "DeathRegistered", death_of(someone()), withhold={"nino"}),
        delivered(agency, "DeathRegistered", death_of(twice)),
        void_of(death),
        delivered(agency, "DeathRegistered", death_of(twice)),
        between,
        delivered(agency, "DeathRegistered", death_of(last)),
    ]
    return events, [pat, sam, twice, last]


T = TypeVar("T")


async def _in_turn_and_as_a_batch(
    pool: asyncpg.Pool,
    agency: str,
    handler: BatchHandler,
    build: Callable[[asyncpg.Pool], Awaitable[tuple[list[DeliveredEvent], list[T]]]],
) -> tuple[list[tuple[str, str | None]], list[T], list[T]]:
    """Builds the same story twice, for different people; applies one copy event by
    event and the other as one batch, and checks each event had the same outcome in
    both. Returns the outcomes and the records each copy touched."""
    one_by_one, touched = await build(pool)
    receipts = [await apply(pool, agency, event) for event in one_by_one]
    batch, batch_touched = await build(pool)

    applied = await apply_batch(pool, agency, batch, handler)

    expected = [(r.outcome, r.reason) for r in receipts]
    assert [(applied[e.event_id].outcome, applied[e.event_id].reason) for e in batch] == expected
    stored = await pool.fetch(
        "SELECT outcome FROM agency.inbox WHERE agency = $1 AND event_id = ANY($2::uuid[])",
        agency,
        [e.event_id for e in batch],
    )
    assert sorted(r["outcome"] for r in stored) == sorted(o for o, _ in expected), "each kept in the inbox"
    return expected, touched, batch_touched


@pytest.mark.parametrize(
    ("agency", "handler", "no_record"),
    [
        ("dwp", pensions.PENSIONS, pensions.NO_AWARD),
        ("hmrc", tax.TAX, tax.NO_RECORD),
    ],
)
async def test_a_batch_applied_set_wise_ends_exactly_as_each_event_applied_in_turn(
    pool: asyncpg.Pool, agency: str, handler: BatchHandler, no_record: str
) -> None:
    expected, people, batch_people = await _in_turn_and_as_a_batch(
        pool, agency, handler, lambda pool: _deaths_batch(pool, agency)
    )
    applied_ = ("APPLIED", None)
    assert expected == [
        applied_,
        applied_,
        ("REJECTED", no_record),
        ("REJECTED", "the National Insurance number was not delivered"),
        applied_,
        applied_,
        applied_,
        applied_,
        applied_,
    ]
    after = await _state(pool, agency, people)
    assert [row[:2] for row in after] == [
        ("in_payment" if agency == "dwp" else "open", None),  # its death voided
        ("stopped" if agency == "dwp" else "closed", DIED_ON),
        ("stopped" if agency == "dwp" else "closed", DIED_ON),  # by the first of its two deaths
        ("stopped" if agency == "dwp" else "closed", DIED_ON),
    ]
    assert await _state(pool, agency, batch_people) == after
    if agency == "hmrc":
        assert after[3][2] == "LS2 7EW", "the move before the last death was applied"


# --- dvla: driving licences -------------------------------------------------------------------


async def _licence(pool: asyncpg.Pool, driver_number: str) -> asyncpg.Record:
    return await pool.fetchrow("SELECT * FROM agency.driving_licence WHERE driver_number = $1", driver_number)


async def test_licence_is_cancelled_on_death_matched_by_surname_forename_and_date_of_birth(
    pool: asyncpg.Pool,
) -> None:
    pat = someone()
    # The licence holds a middle name and the old address; neither gets in the way.
    licence = await records.issue_driving_licence(
        pool, replace(pat, given_names="Pat Jo").person(), models.Address(**an_address("LS9 9ZZ"))
    )

    receipt = await apply(pool, "dvla", delivered("dvla", "DeathRegistered", death_of(pat)))

    assert receipt.outcome == "APPLIED"
    held = await _licence(pool, licence)
    assert (held["status"], held["cancelled_on"], held["cancellation_reason"]) == (
        "cancelled",
        DIED_ON,
        "holder died",
    )


async def test_licence_is_matched_by_name_and_postcode_when_the_date_of_birth_is_not_delivered(
    pool: asyncpg.Pool,
) -> None:
    pat = someone()
    licence = await records.issue_driving_licence(pool, pat.person(), pat.home())

    undated = replace(pat, date_of_birth=None)
    receipt = await apply(pool, "dvla", delivered("dvla", "DeathRegistered", death_of(undated)))

    assert receipt.outcome == "APPLIED"
    assert (await _licence(pool, licence))["status"] == "cancelled"


async def test_licence_of_a_namesake_born_on_another_day_is_not_cancelled(pool: asyncpg.Pool) -> None:
    pat = someone()
    licence = await records.issue_driving_licence(pool, pat.person(), pat.home())
    namesake = replace(pat, date_of_birth=BORN + timedelta(days=1))
    body = death_of(namesake)

    receipt = await apply(pool, "dvla", delivered("dvla", "DeathRegistered", body))

    assert assert_rejected_without_personal_data(receipt, body) == (
        "no driving licence matches the name and date of birth"
    )
    assert (await _licence(pool, licence))["status"] == "valid"


async def test_licence_takes_the_new_address_from_a_change_of_address(pool: asyncpg.Pool) -> None:
    jo = someone(born=date(1985, 7, 14), given_names="Jo")
    licence = await records.issue_driving_licence(pool, jo.person(), jo.home())
    new_address = an_address("LS3 3BB")

    receipt = await apply(pool, "dvla", delivered("dvla", "AddressChanged", move_of(jo, new_address)))

    assert receipt.outcome == "APPLIED"
    held = await _licence(pool, licence)
    assert (list(held["address_lines"]), held["postcode"], held["address_from"]) == (
        new_address["lines"],
        "LS3 3BB",
        MOVED_ON,
    )


async def test_a_move_without_a_date_of_birth_cannot_be_matched_by_dvla(pool: asyncpg.Pool) -> None:
    # DVLA is sent the new address only, so without a date of birth nothing identifies the licence.
    jo = someone(born=None, given_names="Jo")
    body = move_of(jo, an_address("LS3 3BB"))

    receipt = await apply(pool, "dvla", delivered("dvla", "AddressChanged", body))

    assert "date of birth" in assert_rejected_without_personal_data(receipt, body)


async def test_two_licences_matching_the_deceased_are_left_for_a_person_to_check(pool: asyncpg.Pool) -> None:
    pat = someone()
    first = await records.issue_driving_licence(pool, pat.person(), pat.home())
    second = await records.issue_driving_licence(pool, pat.person(), pat.home(), first[:-3] + "8AA")
    body = death_of(pat)

    receipt = await apply(pool, "dvla", delivered("dvla", "DeathRegistered", body))

    assert "more than one" in assert_rejected_without_personal_data(receipt, body)
    assert [(await _licence(pool, n))["status"] for n in (first, second)] == ["valid", "valid"]


def request_about(who: Someone, agency: str, **details: str) -> DeliveredEvent:
    """An informant's request after ``who``'s death, as ``agency`` receives it."""
    event_id = uuid.uuid4()
    envelope = models.Envelope(
        event_id=event_id,
        reference="TUO-2026-TEST-0002",
        occurred_at=datetime.now(UTC),
        recorded_at=datetime.now(UTC),
        subject=models.SubjectIdentifiers(subject_id=f"s-{uuid.uuid4().hex}", nino=who.nino),
        informant=models.Informant(name="Alex Example", relationship="daughter"),
        channel="ONLINE",
        registration_office="online",
        provenance=models.Provenance(source_system="tuo-intake", recorded_by="informant:online"),
    )
    event = models.ServicesRequested(
        envelope=envelope,
        requests_event_id=uuid.uuid4(),
        requests_reference="TUO-2026-TEST-0001",
        requested_event_type="DeathRegistered",
        person=who.person(),
        date_of_death=DIED_ON,
        address=who.home(),
        **details,
    ).avro()
    granted = GRANTED[(agency, "ServicesRequested")]
    value = encode(f"ServicesRequested{DISCLOSURE_SUFFIX}", minimise("ServicesRequested", event, granted))
    return DeliveredEvent(event_id=str(event_id), event_type="ServicesRequested", record=decode(value)[1])


async def test_the_licence_number_the_informant_gave_finds_the_licence_a_name_alone_cannot(
    pool: asyncpg.Pool,
) -> None:
    pat = someone()
    first = await records.issue_driving_licence(pool, pat.person(), pat.home())
    second = await records.issue_driving_licence(pool, pat.person(), pat.home(), first[:-3] + "8AA")
    # By name and date of birth the death matches both licences, and is left for a person...
    death = await apply(pool, "dvla", delivered("dvla", "DeathRegistered", death_of(pat)))
    assert death.outcome == "REJECTED"
    # ...but the number the informant gave names one of them.
    receipt = await apply(pool, "dvla", request_about(pat, "dvla", driving_licence_number=second))
    assert receipt.outcome == "APPLIED", receipt.reason
    held = [await _licence(pool, n) for n in (first, second)]
    assert [(h["status"], h["cancelled_on"]) for h in held] == [("valid", None), ("cancelled", DIED_ON)]


async def test_a_licence_number_dvla_does_not_hold_or_of_another_person_is_rejected(
    pool: asyncpg.Pool,
) -> None:
    pat, jo = someone(), someone(given_names="Jo")
    jos = await records.issue_driving_licence(pool, jo.person(), jo.home())
    unknown = await apply(pool, "dvla", request_about(pat, "dvla", driving_licence_number=jos[:-3] + "7ZZ"))
    another = await apply(pool, "dvla", request_about(pat, "dvla", driving_licence_number=jos))
    assert (unknown.outcome, unknown.reason) == ("REJECTED", licensing.NO_SUCH_LICENCE)
    assert (another.outcome, another.reason) == ("REJECTED", licensing.ANOTHER_HOLDER)
    assert (await _licence(pool, jos))["status"] == "valid"


async def test_the_passport_office_applies_a_request_it_is_sent(pool: asyncpg.Pool) -> None:
    receipt = await apply(pool, "hmpo", request_about(someone(), "hmpo", passport_number="123456789"))
    assert receipt.outcome == "APPLIED"


async def _dvla_deaths_batch(pool: asyncpg.Pool) -> tuple[list[DeliveredEvent], list[str]]:
    """Every path a batch of deaths can take at DVLA, for new people: deaths matched by
    date of birth and by postcode, a death matching no licence, one matching two, one
    that cannot be matched at all, two deaths of one person, a void of the first, a
    move between deaths, and one more death. Returns the events, in order, and the
    licences they touch."""
    pat, sam, undated, nobody, twins, twice, last = (someone() for _ in range(7))
    licences = [
        await records.issue_driving_licence(pool, p.person(), p.home())
        for p in (pat, sam, undated, twice, last)
    ]
    first_twin = await records.issue_driving_licence(pool, twins.person(), twins.home())
    await records.issue_driving_licence(pool, twins.person(), twins.home(), first_twin[:-3] + "8AA")
    death = delivered("dvla", "DeathRegistered", death_of(pat))
    events = [
        death,
        delivered("dvla", "DeathRegistered", death_of(sam)),
        delivered("dvla", "DeathRegistered", death_of(replace(undated, date_of_birth=None))),
        delivered("dvla", "DeathRegistered", death_of(nobody)),
        delivered("dvla", "DeathRegistered", death_of(twins)),
        delivered(
            "dvla",
            "DeathRegistered",
            death_of(replace(someone(), date_of_birth=None)),
            withhold={"last_address"},
        ),
        delivered("dvla", "DeathRegistered", death_of(twice)),
        delivered("dvla", "DeathRegistered", death_of(twice, died_on=DIED_ON + timedelta(days=1))),
        void_of(death),
        delivered("dvla", "AddressChanged", move_of(last, an_address("LS2 7EW"))),
        delivered("dvla", "DeathRegistered", death_of(last)),
    ]
    return events, [*licences, first_twin]


async def _licence_states(pool: asyncpg.Pool, driver_numbers: list[str]) -> list[tuple[Any, ...]]:
    held = [await _licence(pool, n) for n in driver_numbers]
    return [(r["status"], r["cancelled_on"], r["cancellation_reason"], r["postcode"]) for r in held]


async def test_a_batch_of_deaths_at_dvla_ends_exactly_as_each_event_applied_in_turn(
    pool: asyncpg.Pool,
) -> None:
    expected, licences, batch_licences = await _in_turn_and_as_a_batch(
        pool, "dvla", licensing.LICENSING, _dvla_deaths_batch
    )
    applied_ = ("APPLIED", None)
    assert expected == [
        applied_,
        applied_,
        applied_,
        ("REJECTED", licensing.NO_MATCH_BY_BIRTH),
        ("REJECTED", licensing.AMBIGUOUS),
        ("REJECTED", licensing.UNFINDABLE),
        applied_,
        applied_,  # the licence is already cancelled: nothing changes
        applied_,
        applied_,
        applied_,
    ]
    after = await _licence_states(pool, licences)
    assert [row[:2] for row in after] == [
        ("valid", None),  # its death voided
        ("cancelled", DIED_ON),
        ("cancelled", DIED_ON),  # matched by postcode
        ("cancelled", DIED_ON),  # by the first of its two deaths
        ("cancelled", DIED_ON),
        ("valid", None),  # one of two that matched: left for a person
    ]
    assert after[4][3] == "LS2 7EW", "the move before the last death was applied"
    assert await _licence_states(pool, batch_licences) == after


# --- councils: households, the discount, the electoral register -------------------------------


async def _household(pool: asyncpg.Pool, household: int) -> asyncpg.Record:
    return await pool.fetchrow("SELECT * FROM agency.council_household WHERE id = $1", household)


async def _residents(pool: asyncpg.Pool, household: int) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch("SELECT * FROM agency.council_resident WHERE household_id = $1", household)
    return {r["given_names"]: r for r in rows}


async def _register(pool: asyncpg.Pool, household: int) -> dict[str, str]:
    rows = await pool.fetch("SELECT * FROM agency.electoral_register WHERE household_id = $1", household)
    return {r["given_names"]: r["status"] for r in rows}


def _family(head: Someone, *given_names: str, born: date | None = None) -> list[Someone]:
    return [replace(head, given_names=name, date_of_birth=born, nino=random_nino()) for name in given_names]


async def test_death_leaving_one_adult_gives_the_household_the_single_person_discount(
    pool: asyncpg.Pool,
) -> None:
    pat = someone()
    chris = _family(pat, "Chris")[0]
    robin = _family(pat, "Robin", born=date(2012, 5, 1))[0]
    household = await records.register_household(
        pool,
        "council-leeds",
        pat.home(),
        [Resident(pat.person()), Resident(chris.person()), Resident(robin.person(), adult=False)],
    )
    assert not (await _household(pool, household))["single_person_discount"]

    receipt = await apply(pool, "council-leeds", delivered("council-leeds", "DeathRegistered", death_of(pat)))

    assert receipt.outcome == "APPLIED"
    assert (await _household(pool, household))["single_person_discount"], "Chris is the one adult left"
    residents = await _residents(pool, household)
    assert (residents["Pat"]["left_on"], residents["Pat"]["left_because"]) == (DIED_ON, "died")
    assert residents["Chris"]["left_on"] is None
    assert await _register(pool, household) == {"Pat": "removed", "Chris": "registered"}


async def test_death_leaving_two_adults_gives_no_single_person_discount(pool: asyncpg.Pool) -> None:
    pat = someone()
    others = _family(pat, "Chris", "Sam")
    household = await records.register_household(
        pool, "council-leeds", pat.home(), [Resident(p.person()) for p in [pat, *others]]
    )

    await apply(pool, "council-leeds", delivered("council-leeds", "DeathRegistered", death_of(pat)))

    assert not (await _household(pool, household))["single_person_discount"]
    assert (await _register(pool, household))["Pat"] == "removed"


async def test_death_at_an_address_the_council_does_not_hold_is_rejected_without_personal_data(
    pool: asyncpg.Pool,
) -> None:
    body = death_of(someone())

    receipt = await apply(pool, "council-leeds", delivered("council-leeds", "DeathRegistered", body))

    assert "no household" in assert_rejected_without_personal_data(receipt, body)


async def test_a_death_outside_the_councils_areas_is_applied_there_without_effect(pool: asyncpg.Pool) -> None:
    pat = someone("LS1 1AA")
    household = await records.register_household(pool, "council-leeds", pat.home(), [Resident(pat.person())])

    receipt = await apply(
        pool, "council-bradford", delivered("council-bradford", "DeathRegistered", death_of(pat))
    )

    assert receipt.outcome == "APPLIED"
    assert (await _residents(pool, household))["Pat"]["left_on"] is None


async def _council_deaths_batch(pool: asyncpg.Pool) -> tuple[list[DeliveredEvent], list[int]]:
    """Every path a batch of deaths can take at a council, for new households: deaths
    in one household (the second of one person twice), matched without a UPRN, at an
    address the council does not hold, of someone it never knew there, of one of two
    namesakes, outside its areas, without the last address, a void, a move out of a
    household between deaths, and one more death there. Returns the events, in order,
    and the households."""
    pat = someone()
    chris, robin = _family(pat, "Chris")[0], _family(pat, "Robin", born=date(2012, 5, 1))[0]
    home = await records.register_household(
        pool,
        "council-leeds",
        pat.home(),
        [Resident(pat.person()), Resident(chris.person()), Resident(robin.person(), adult=False)],
    )
    jo = someone(uprn=False, given_names="Jo")
    jos = await records.register_household(pool, "council-leeds", jo.home(), [Resident(jo.person())])
    sam = someone(given_names="Sam")
    namesakes = await records.register_household(
        pool, "council-leeds", sam.home(), [Resident(sam.person()), Resident(sam.person())]
    )
    kim = someone(given_names="Kim")
    lee = _family(kim, "Lee")[0]
    kims = await records.register_household(
        pool, "council-leeds", kim.home(), [Resident(kim.person()), Resident(lee.person())]
    )
    death = delivered("council-leeds", "DeathRegistered", death_of(pat))
    events = [
        death,
        delivered("council-leeds", "DeathRegistered", death_of(jo)),
        delivered("council-leeds", "DeathRegistered", death_of(pat, died_on=DIED_ON + timedelta(days=1))),
        delivered("council-leeds", "DeathRegistered", death_of(someone())),
        delivered("council-leeds", "DeathRegistered", death_of(replace(jo, given_names="Alex"))),
        delivered("council-leeds", "DeathRegistered", death_of(sam)),
        delivered("council-leeds", "DeathRegistered", death_of(someone("BD1 1AA"))),
        delivered("council-leeds", "DeathRegistered", death_of(someone()), withhold={"last_address"}),
        delivered("council-leeds", "DeathRegistered", death_of(chris)),
        void_of(death),
        delivered("council-leeds", "AddressChanged", move_of(lee, an_address("BD1 1AA"))),
        delivered("council-leeds", "DeathRegistered", death_of(kim)),
    ]
    return events, [home, jos, namesakes, kims]


async def _council_states(pool: asyncpg.Pool, households: list[int]) -> list[tuple[Any, ...]]:
    states = []
    for household in households:
        residents = await pool.fetch(
            "SELECT given_names, left_on, left_because FROM agency.council_resident"
            " WHERE household_id = $1 ORDER BY id",
            household,
        )
        register = await pool.fetch(
            "SELECT given_names, status, removed_on FROM agency.electoral_register"
            " WHERE household_id = $1 ORDER BY id",
            household,
        )
        states.append(
            (
                (await _household(pool, household))["single_person_discount"],
                [tuple(r) for r in residents],
                [tuple(r) for r in register],
            )
        )
    return states


async def test_a_batch_of_deaths_at_a_council_ends_exactly_as_each_event_applied_in_turn(
    pool: asyncpg.Pool,
) -> None:
    leeds = CouncilHandler("council-leeds", COUNCIL_AUTHORITIES["council-leeds"])
    expected, households, batch_households = await _in_turn_and_as_a_batch(
        pool, "council-leeds", leeds, _council_deaths_batch
    )
    applied_ = ("APPLIED", None)
    assert expected == [
        applied_,
        applied_,  # matched by postcode and first line
        applied_,  # the second death of one person changes nothing
        ("REJECTED", council.NO_HOUSEHOLD),
        ("REJECTED", council.NO_RECORD_OF_DECEASED),
        ("REJECTED", council.AMBIGUOUS),
        applied_,  # outside Leeds
        ("REJECTED", "the last address was not delivered"),
        applied_,
        applied_,  # a void: the council keeps no link to undo
        applied_,
        applied_,
    ]
    after = await _council_states(pool, households)
    home, jos, namesakes, kims = after
    assert home == (
        False,  # no adult left
        [("Pat", DIED_ON, "died"), ("Chris", DIED_ON, "died"), ("Robin", None, None)],
        [("Pat", "removed", DIED_ON), ("Chris", "removed", DIED_ON)],
    )
    assert jos == (False, [("Jo", DIED_ON, "died")], [("Jo", "removed", DIED_ON)])
    assert namesakes[1] == [("Sam", None, None), ("Sam", None, None)], "left for a person to check"
    assert kims == (
        False,
        [("Kim", DIED_ON, "died"), ("Lee", MOVED_ON, "moved away")],
        [("Kim", "removed", DIED_ON), ("Lee", "removed", MOVED_ON)],
    )
    assert await _council_states(pool, batch_households) == after


async def test_moving_out_leaves_the_household_and_the_register_matched_without_a_uprn(
    pool: asyncpg.Pool,
) -> None:
    jo = someone(born=date(1985, 7, 14), given_names="Jo")
    partner = _family(jo, "Chris")[0]
    household = await records.register_household(
        pool, "council-leeds", jo.home(), [Resident(jo.person()), Resident(partner.person())]
    )
    # The informant gives the old address without its UPRN, in their own spelling.
    as_told = {**jo.address, "uprn": None, "lines": [jo.address["lines"][0].upper().replace(" ", ", ", 1)]}

    body = move_of(replace(jo, address=as_told), an_address("BD1 1AA"))
    receipt = await apply(pool, "council-leeds", delivered("council-leeds", "AddressChanged", body))

    assert receipt.outcome == "APPLIED"
    residents = await _residents(pool, household)
    assert (residents["Jo"]["left_on"], residents["Jo"]["left_because"]) == (MOVED_ON, "moved away")
    assert await _register(pool, household) == {"Jo": "removed", "Chris": "registered"}
    assert (await _household(pool, household))["single_person_discount"], "Chris now lives alone"


async def test_moving_in_creates_a_household_and_registers_the_adults_but_not_the_children(
    pool: asyncpg.Pool,
) -> None:
    jo = someone("YO1 7HH", born=date(1985, 7, 14), given_names="Jo")
    child = _family(jo, "Robin", born=date(2015, 6, 1))[0]
    new_address = an_address("BD7 1DP")

    body = move_of(jo, new_address, moving_with=[child])
    receipt = await apply(pool, "council-bradford", delivered("council-bradford", "AddressChanged", body))

    assert receipt.outcome == "APPLIED"
    household = await pool.fetchval(
        "SELECT id FROM agency.council_household WHERE council = 'council-bradford' AND uprn = $1",
        new_address["uprn"],
    )
    assert household is not None
    residents = await _residents(pool, household)
    assert {name: (r["adult"], r["moved_in_on"]) for name, r in residents.items()} == {
        "Jo": (True, MOVED_ON),
        "Robin": (False, MOVED_ON),
    }
    assert await _register(pool, household) == {"Jo": "registered"}
    assert (await _household(pool, household))["single_person_discount"], "one adult and a child"


async def test_moving_within_the_council_takes_the_resident_from_one_household_to_the_other(
    pool: asyncpg.Pool,
) -> None:
    jo = someone(born=date(1985, 7, 14), given_names="Jo")
    partner = _family(jo, "Chris")[0]
    old = await records.register_household(
        pool, "council-leeds", jo.home(), [Resident(jo.person()), Resident(partner.person())]
    )
    sam = someone("LS6 2AB", given_names="Sam")
    new = await records.register_household(pool, "council-leeds", sam.home(), [Resident(sam.person())])
    assert (await _household(pool, new))["single_person_discount"]

    body = move_of(jo, sam.address)
    receipt = await apply(pool, "council-leeds", delivered("council-leeds", "AddressChanged", body))

    assert receipt.outcome == "APPLIED"
    assert (await _household(pool, old))["single_person_discount"], "Chris is left alone"
    assert not (await _household(pool, new))["single_person_discount"], "Sam no longer lives alone"
    assert await _register(pool, new) == {"Sam": "registered", "Jo": "registered"}


async def test_moving_out_of_an_address_the_council_does_not_hold_is_rejected_without_personal_data(
    pool: asyncpg.Pool,
) -> None:
    body = move_of(someone(given_names="Jo"), an_address("BD1 1AA"))

    receipt = await apply(pool, "council-leeds", delivered("council-leeds", "AddressChanged", body))

    assert "previous address" in assert_rejected_without_personal_data(receipt, body)


# --- which handler each agency runs -----------------------------------------------------------


def test_each_agency_runs_its_own_reference_handler() -> None:
    assert handler_for("council-bradford") == CouncilHandler("council-bradford", frozenset({"E08000032"}))
    assert handler_for("council-leeds") == CouncilHandler("council-leeds", frozenset({"E08000035"}))
    assert handler_for("hmpo") is apply_life_event


# --- the demo ---------------------------------------------------------------------------------

DEMO_EVENT_TYPES = {
    "/v1/death-registrations": "DeathRegistered",
    "/v1/birth-registrations": "BirthRegistered",
    "/v1/address-changes": "AddressChanged",
}
# Who the demo's events reach: by statute, or by the consent given in the demo submissions.
DEMO_RECIPIENTS = {
    "DeathRegistered": ("hmrc", "dwp", "dvla", "council-leeds", "ons"),
    "BirthRegistered": ("dwp",),
    "AddressChanged": ("dvla", "council-leeds"),
}


async def test_every_agency_entitled_to_the_demo_events_applies_them(pool: asyncpg.Pool) -> None:
    today = today_in_the_uk()
    # The demo starts from a fresh database; the session's other tests have already
    # registered deaths under the demo's NINO.
    await pool.execute("DELETE FROM agency.tax_record WHERE nino = 'AB123456C'")
    await pool.execute("DELETE FROM agency.pension_award WHERE nino = 'AB123456C'")
    await seed_agency_records(pool, today)
    await seed_agency_records(pool, today)  # seeding twice changes nothing

    outcomes = {}
    for path, body in demo_submissions(today):
        event_type = DEMO_EVENT_TYPES[path]
        for agency in DEMO_RECIPIENTS[event_type]:
            receipt = await apply(pool, agency, delivered(agency, event_type, body))
            outcomes[(agency, event_type)] = (receipt.outcome, receipt.reason)

    assert set(outcomes.values()) == {("APPLIED", None)}, outcomes
    died_on = today - timedelta(days=3)
    assert (await _tax_record(pool, "AB123456C"))["closed_on"] == died_on
    # Paid up to today, three days after the death: 23025 × 3 / 7 = 9867.86…
    assert (await _award(pool, "AB123456C"))["overpayment_pence"] == 9867
    assert await pool.fetchval(
        "SELECT bool_and(single_person_discount) FROM agency.council_household"
        " WHERE council = 'council-leeds' AND uprn = '72000001'"
    ), "the surviving partner lives alone"
    moved = await pool.fetchval(
        "SELECT count(*) FROM agency.driving_licence WHERE family_name = 'Citizen' AND postcode = $1",
        "LS3 1AB",
    )
    assert moved == 1, "the mover's licence has the new address"
