"""Councils by local authority, not by postcode prefix.

Postcode districts cross council boundaries: LS29 (Ilkley) is mostly in Bradford,
and BD23 (Skipton) is in North Yorkshire, not Bradford. Intake places each address
in its local authority with the ONS Postcode Directory and stores the GSS code in
the event; councils subscribe by code; a postcode the directory does not know
gives "withheld: area unknown". The postcodes here are real ones, checked against
the directory that ships with the project.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from citizens.data_tracker import consent_settings
from router.organisations import organisations_to_tell
from router.rules import Condition, Outcome, RoutableEvent, Subscription, decide
from router.seed import read_seed
from router.store import record_consent
from runtime.kafka import Topics
from runtime.local_authorities import local_authority
from runtime.pseudonyms import subject_id_for
from runtime.settings import Settings
from schemas import decode
from tests.support import death_registration, eventually, header, random_nino, read_topic, today, tuo_cli

LEEDS, BRADFORD, NORTH_YORKSHIRE = "E08000035", "E08000032", "E06000065"
ILKLEY = "LS29 0AA"  # LS29, in Bradford
HEADINGLEY = "LS6 1AA"  # LS6, in Leeds
SKIPTON = "BD23 0AB"  # BD23, in North Yorkshire: a BD postcode that is not Bradford's
BRADFORD_CENTRE = "BD1 1HY"
YORK = "YO1 7HH"
UNKNOWN = "LS99 9ZZ"  # the right shape, but no such postcode
NOW = datetime(2026, 11, 21, 12, tzinfo=UTC)


# --- The directory --------------------------------------------------------------------


def test_the_directory_places_postcodes_in_their_council_not_by_their_letters() -> None:
    assert local_authority(ILKLEY) == BRADFORD, "LS29 0AA is in Bradford, though it starts LS"
    assert local_authority("LS29 6AA") == LEEDS, "LS29 straddles the boundary: 6AA is in Leeds"
    assert local_authority(HEADINGLEY) == LEEDS
    assert local_authority(SKIPTON) == NORTH_YORKSHIRE, "BD23 0AB is in North Yorkshire, not Bradford"
    assert local_authority("BD23 3JS") == "E07000122", "and BD23 3JS in Pendle, Lancashire"
    assert local_authority(BRADFORD_CENTRE) == BRADFORD
    assert local_authority("ls290aa") == local_authority("LS29 0AA"), "any spacing or case"
    assert local_authority("B1 1AA") == "E08000025", "a one-letter area (Birmingham)"


def test_the_directory_covers_the_four_nations_and_names_the_crown_dependencies() -> None:
    assert local_authority("CF10 1AA") == "W06000015"  # Cardiff
    assert local_authority("EH1 1AA") == "S12000036"  # City of Edinburgh
    assert local_authority("BT1 1AA") == "N09000003"  # Belfast
    # Jersey, Guernsey and the Isle of Man have no UK council: the ONS pseudo-codes.
    assert local_authority("JE2 3AB") == "L99999999"
    assert local_authority("GY1 1AA") == "L99999999"
    assert local_authority("IM1 1AA") == "M99999999"


@pytest.mark.parametrize(
    "postcode",
    [
        UNKNOWN,
        "LS1 9AR",  # in the directory, but non-geographic: no authority
        "",
        "   ",
        "NOT A POSTCODE",
        "LS29 0AA'; DROP TABLE subscription; --",
        "LS29\x000AA",
        "🙂🙂🙂",
        "Q" * 100_000,
        "QA1 1AA",  # no postcode starts with Q: no file for the letter
    ],
)
def test_an_unknown_malformed_or_hostile_postcode_has_no_authority(postcode: str) -> None:
    assert local_authority(postcode) is None


def test_a_lookup_is_a_binary_search_in_memory_once_the_letter_is_loaded() -> None:
    local_authority(ILKLEY)  # load L
    started = time.perf_counter()
    for _ in range(20_000):
        local_authority(ILKLEY)
    assert time.perf_counter() - started < 1.0, "20,000 lookups in under a second (measured: ~30 ms)"


# --- The routing rule, with the seed's councils -------------------------------------------


def _seed_subscriptions() -> list[Subscription]:
    return [
        Subscription(
            agency=item["agency"],
            event_type=item["event_type"],
            legal_basis=item["legal_basis"],
            statute=item.get("statute"),
            valid_from=None,
            valid_to=None,
            status="active",
            fields=frozenset(item["fields"]) if item.get("fields") else None,
            condition=Condition.from_json(item.get("condition")),
        )
        for item in read_seed()
    ]


def _event(event_type: str, *postcodes: str) -> RoutableEvent:
    """An event as the router sees it: the authorities intake found for the subject's addresses."""
    found = [local_authority(p) for p in postcodes]
    return RoutableEvent(
        "e-1",
        event_type,
        "s-1",
        postcodes=frozenset(postcodes),
        local_authorities=frozenset(code for code in found if code is not None),
        area_unknown=None in found,
    )


def _councils(event: RoutableEvent, consent: dict[str, Any] | None = None) -> dict[str, Outcome]:
    return {
        d.agency: d.outcome
        for d in decide(event, _seed_subscriptions(), consent or {}, NOW)
        if d.agency.startswith("council-")
    }


def test_the_seed_names_councils_by_local_authority() -> None:
    conditions = {s.agency: s.condition for s in _seed_subscriptions() if s.agency.startswith("council-")}
    assert conditions == {
        "council-leeds": Condition(local_authorities=frozenset({LEEDS})),
        "council-bradford": Condition(local_authorities=frozenset({BRADFORD})),
    }


def test_a_death_in_ls29_goes_to_bradford_in_ls6_to_leeds_in_bd23_to_neither() -> None:
    no_subscription = Outcome.WITHHELD_NO_SUBSCRIPTION
    assert _councils(_event("DeathRegistered", ILKLEY)) == {
        "council-bradford": Outcome.DELIVERED,
        "council-leeds": no_subscription,
    }
    assert _councils(_event("DeathRegistered", HEADINGLEY)) == {
        "council-bradford": no_subscription,
        "council-leeds": Outcome.DELIVERED,
    }
    assert _councils(_event("DeathRegistered", SKIPTON)) == {
        "council-bradford": no_subscription,
        "council-leeds": no_subscription,
    }


def test_an_unknown_postcode_is_withheld_as_area_unknown_not_as_not_subscribed() -> None:
    assert _councils(_event("DeathRegistered", UNKNOWN)) == {
        "council-bradford": Outcome.WITHHELD_AREA_UNKNOWN,
        "council-leeds": Outcome.WITHHELD_AREA_UNKNOWN,
    }
    # A move from an unknown postcode into Leeds: Leeds is told (with consent); Bradford
    # might have been the old council, so it is "area unknown", not "not subscribed".
    move = _event("AddressChanged", UNKNOWN, HEADINGLEY)
    assert _councils(move, {"council-leeds": "given", "council-bradford": "given"}) == {
        "council-bradford": Outcome.WITHHELD_AREA_UNKNOWN,
        "council-leeds": Outcome.DELIVERED,
    }
    # Without consent, consent is the reason given for Leeds.
    assert _councils(move)["council-leeds"] is Outcome.WITHHELD_NO_CONSENT
    # Agencies without an area condition are untouched by the unknown area.
    [hmrc] = [
        d
        for d in decide(_event("DeathRegistered", UNKNOWN), _seed_subscriptions(), {}, NOW)
        if d.agency == "hmrc"
    ]
    assert hmrc.outcome is Outcome.DELIVERED


def test_a_move_from_leeds_to_ilkley_concerns_both_councils() -> None:
    consent = {"council-leeds": "given", "council-bradford": "given"}
    assert _councils(_event("AddressChanged", HEADINGLEY, ILKLEY), consent) == {
        "council-bradford": Outcome.DELIVERED,
        "council-leeds": Outcome.DELIVERED,
    }


def test_an_older_postcode_area_condition_is_still_read() -> None:
    legacy = Condition.from_json({"postcode_areas": ["LS"]})
    assert legacy.holds_for(_event("DeathRegistered", ILKLEY)), "as before migration 0020, wrong as it was"
    assert not legacy.holds_for(_event("DeathRegistered", BRADFORD_CENTRE))
    assert not legacy.undecided_for(_event("DeathRegistered", UNKNOWN)), "areas by letters are never unknown"
    assert legacy.describe() == "postcode area LS"
    assert Condition.from_json({"local_authorities": ["e08000035"]}).describe() == "local authority E08000035"


# --- Intake, router and agencies, against the real broker and database ---------------------


async def _settled_decisions(intake: httpx.AsyncClient, reference: str) -> dict[str, str]:
    async def decided() -> dict[str, str] | None:
        status = (await intake.get(f"/v1/events/{reference}")).json()
        decisions = {a["agency"]: a["decision"] for a in status.get("agencies", [])}
        return decisions if {"council-leeds", "council-bradford"} <= decisions.keys() else None

    return await eventually(decided, timeout=60, what=f"routing decisions for {reference}")


async def _published(services: Settings, event_id: str) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        for record in await read_topic(services, Topics(services.topic_prefix).life_events):
            if header(record, "ce_id") == event_id:
                return decode(record.value or b"")[1]
        return None

    return await eventually(found, timeout=30, what="the event on the life-events topic")


def _death_at(postcode: str) -> dict[str, Any]:
    nino = random_nino()
    return death_registration(
        deceased={
            "given_names": "Pat",
            "family_name": "Example",
            "date_of_birth": "1941-03-02",
            "nino": nino,
        },
        last_address={"lines": ["1 Example Street"], "town": "Somewhere", "postcode": postcode},
    )


@pytest.mark.integration
async def test_intake_stores_the_authority_in_the_event_and_the_router_decides_from_it(
    intake: httpx.AsyncClient, services: Settings, pool: asyncpg.Pool
) -> None:
    expected = {
        ILKLEY: (BRADFORD, {"council-bradford": "delivered", "council-leeds": "withheld_no_subscription"}),
        HEADINGLEY: (LEEDS, {"council-bradford": "withheld_no_subscription", "council-leeds": "delivered"}),
        SKIPTON: (
            NORTH_YORKSHIRE,
            {"council-bradford": "withheld_no_subscription", "council-leeds": "withheld_no_subscription"},
        ),
        UNKNOWN: (
            None,
            {"council-bradford": "withheld_area_unknown", "council-leeds": "withheld_area_unknown"},
        ),
    }
    accepted = {}
    for postcode in expected:
        response = await intake.post("/v1/death-registrations", json=_death_at(postcode))
        assert response.status_code == 201, response.text
        accepted[postcode] = response.json()
    for postcode, (authority, councils) in expected.items():
        event = await _published(services, accepted[postcode]["event_id"])
        assert event["last_address"]["local_authority"] == authority, postcode
        assert event["last_address"]["postcode"] == postcode
        decisions = await _settled_decisions(intake, accepted[postcode]["reference"])
        assert {k: v for k, v in decisions.items() if k.startswith("council-")} == councils, postcode
        assert decisions["hmrc"] == "delivered", "national agencies do not depend on the area"
        stored = await pool.fetchval(
            "SELECT local_authorities FROM intake_record WHERE event_id = $1::uuid",
            accepted[postcode]["event_id"],
        )
        assert stored == ([authority] if authority else [])

    # Bradford's copy of the Ilkley death carries the authority it was routed on.
    async def at_bradford() -> dict[str, Any] | None:
        for record in await read_topic(services, Topics(services.topic_prefix).agency("council-bradford")):
            if header(record, "ce_id") == accepted[ILKLEY]["event_id"]:
                return decode(record.value or b"")[1]
        return None

    copy = await eventually(at_bradford, timeout=30, what="the Ilkley death at Bradford")
    assert copy["last_address"]["local_authority"] == BRADFORD

    # Operators can list what was withheld for an unknown area, and see why per event.
    code, listing = await asyncio.to_thread(tuo_cli, services, "subscriptions", "area-unknown")
    assert code == 0, listing
    [row] = [line for line in listing.splitlines() if accepted[UNKNOWN]["reference"] in line]
    assert "council-bradford, council-leeds" in row and "DeathRegistered" in row
    assert accepted[ILKLEY]["reference"] not in listing
    assert UNKNOWN not in listing, "no postcode on the operator's screen"
    code, status = await asyncio.to_thread(
        tuo_cli, services, "status", accepted[UNKNOWN]["reference"], "--reason", "checking a test event"
    )
    assert code == 0 and "withheld: area unknown" in status


@pytest.mark.integration
async def test_a_submitter_cannot_choose_the_authority(intake: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    before = await pool.fetchval("SELECT count(*) FROM intake_record")
    body = _death_at(ILKLEY)
    body["last_address"]["local_authority"] = LEEDS
    response = await intake.post("/v1/death-registrations", json=body)
    assert response.status_code == 422, response.text
    assert "last_address.local_authority" in response.text
    assert await pool.fetchval("SELECT count(*) FROM intake_record") == before


@pytest.mark.integration
async def test_a_corrected_postcode_carries_its_new_authority_and_the_authority_itself_is_not_correctable(
    intake: httpx.AsyncClient, services: Settings, pool: asyncpg.Pool
) -> None:
    original = (await intake.post("/v1/death-registrations", json=_death_at(HEADINGLEY))).json()
    refused = await intake.post(
        f"/v1/events/{original['reference']}/corrections",
        json={
            "changes": [{"field": "last_address.local_authority", "value": BRADFORD}],
            "reason": "moved it",
        },
    )
    assert refused.status_code == 422 and "correct the postcode instead" in refused.text
    smuggled = await intake.post(
        f"/v1/events/{original['reference']}/corrections",
        json={
            "changes": [
                {
                    "field": "last_address",
                    "value": {
                        "lines": ["1 Example Street"],
                        "town": "Leeds",
                        "postcode": HEADINGLEY,
                        "uprn": None,
                        "local_authority": BRADFORD,
                    },
                }
            ],
            "reason": "moved it",
        },
    )
    assert smuggled.status_code == 422 and "correct the postcode instead" in smuggled.text
    buried: Any = {"local_authority": BRADFORD}
    for _ in range(400):
        buried = {"inner": [buried]}
    deep = await intake.post(
        f"/v1/events/{original['reference']}/corrections",
        json={"changes": [{"field": "deceased", "value": buried}], "reason": "moved it"},
    )
    assert deep.status_code == 422 and "correct the postcode instead" in deep.text

    response = await intake.post(
        f"/v1/events/{original['reference']}/corrections",
        json={"changes": [{"field": "last_address.postcode", "value": ILKLEY}], "reason": "misheard"},
    )
    assert response.status_code == 201, response.text
    correction = await _published(services, response.json()["event_id"])
    assert [(c["field"], c["new_value_json"]) for c in correction["changes"]] == [
        ("last_address.postcode", f'"{ILKLEY}"'),
        ("last_address.local_authority", f'"{BRADFORD}"'),
        ("last_address_local_authority", f'"{BRADFORD}"'),  # the derived fact follows (schemas/derived.py)
    ]
    stored = await pool.fetchval(
        "SELECT local_authorities FROM intake_record WHERE event_id = $1::uuid", response.json()["event_id"]
    )
    assert stored == [BRADFORD], "the citizen's councils follow the corrected address"


# --- Who the registrar and the citizen are asked about -------------------------------------


async def _councils_to_tell(pool: asyncpg.Pool, event_type: str, *postcodes: str) -> list[str]:
    return [
        o.agency
        for o in await organisations_to_tell(pool, event_type, frozenset(postcodes))
        if o.agency.startswith("council-")
    ]


@pytest.mark.integration
async def test_the_registrar_is_offered_only_the_councils_of_the_persons_addresses(
    pool: asyncpg.Pool,
) -> None:
    assert await _councils_to_tell(pool, "DeathRegistered", ILKLEY) == ["council-bradford"]
    assert await _councils_to_tell(pool, "DeathRegistered", HEADINGLEY) == ["council-leeds"]
    assert await _councils_to_tell(pool, "DeathRegistered", SKIPTON) == []
    assert await _councils_to_tell(pool, "DeathRegistered", UNKNOWN) == []
    # A move: the old council and the new one, and no other.
    assert sorted(await _councils_to_tell(pool, "AddressChanged", HEADINGLEY, ILKLEY)) == [
        "council-bradford",
        "council-leeds",
    ]
    assert await _councils_to_tell(pool, "AddressChanged", YORK, HEADINGLEY) == ["council-leeds"]
    national = [o.agency for o in await organisations_to_tell(pool, "DeathRegistered", frozenset({SKIPTON}))]
    assert {"hmrc", "dwp", "dvla", "hmpo"} <= set(national), "national agencies are listed wherever one lives"


def _move(nino: str, old: str, new: str) -> dict[str, Any]:
    return {
        "informant": {"name": "Kim Example", "relationship": "self"},
        "channel": "desk",
        "person": {
            "given_names": "Kim",
            "family_name": "Example",
            "date_of_birth": "1980-01-01",
            "nino": nino,
        },
        "old_address": {"lines": ["1 Old Street"], "town": "Old", "postcode": old},
        "new_address": {"lines": ["2 New Street"], "town": "New", "postcode": new},
        "effective_date": (today() - timedelta(days=3)).isoformat(),
    }


async def _citizens_councils(pool: asyncpg.Pool, subject_id: str) -> set[tuple[str, str]]:
    return {
        (s.agency, s.event_type)
        for s in await consent_settings(pool, subject_id, None)
        if s.agency.startswith("council-")
    }


@pytest.mark.integration
async def test_the_citizen_sees_only_the_councils_of_their_addresses_and_any_they_chose_before(
    intake: httpx.AsyncClient, services: Settings, pool: asyncpg.Pool
) -> None:
    key = services.require_pseudonym_key()
    mover, stayer, newcomer = random_nino(), random_nino(), random_nino()

    # Someone who moved from Headingley to Ilkley: Leeds (old) and Bradford (new).
    assert (
        await intake.post("/v1/address-changes", json=_move(mover, HEADINGLEY, ILKLEY))
    ).status_code == 201
    assert await _citizens_councils(pool, subject_id_for(mover, key)) == {
        ("council-bradford", "AddressChanged"),
        ("council-bradford", "DeathRegistered"),
        ("council-leeds", "AddressChanged"),
        ("council-leeds", "DeathRegistered"),
    }

    # Someone who moved from York into Skipton: neither demo council is theirs.
    assert (await intake.post("/v1/address-changes", json=_move(stayer, YORK, SKIPTON))).status_code == 201
    stayer_id = subject_id_for(stayer, key)
    assert await _citizens_councils(pool, stayer_id) == set()
    national = {s.agency for s in await consent_settings(pool, stayer_id, None)}
    assert {"hmrc", "dvla"} <= national

    # A choice they made before keeps its council on the page, so they can withdraw it.
    await record_consent(
        pool,
        subject_id=stayer_id,
        agency="council-bradford",
        event_type="AddressChanged",
        choice="given",
        recorded_by="citizen",
    )
    assert await _citizens_councils(pool, stayer_id) == {("council-bradford", "AddressChanged")}

    # Nobody has recorded anything about this person: no council at all.
    assert await _citizens_councils(pool, subject_id_for(newcomer, key)) == set()


_CODES = st.sampled_from([LEEDS, BRADFORD, NORTH_YORKSHIRE, "W06000015"])
_council_subscriptions = st.builds(
    Subscription,
    agency=st.sampled_from(["council-leeds", "council-bradford", "council-x"]),
    event_type=st.just("AddressChanged"),
    legal_basis=st.sampled_from(["statutory", "consent"]),
    statute=st.just("Some Act 1992 s.1"),
    valid_from=st.none(),
    valid_to=st.none(),
    status=st.just("active"),
    condition=st.builds(Condition, local_authorities=st.frozensets(_CODES, max_size=2)),
)
_moves = st.builds(
    RoutableEvent,
    event_id=st.just("e-1"),
    event_type=st.just("AddressChanged"),
    subject_id=st.just("s-1"),
    local_authorities=st.frozensets(_CODES, max_size=2),
    area_unknown=st.booleans(),
)


@given(st.lists(_council_subscriptions, max_size=6), _moves, st.booleans())
def test_a_council_is_told_only_of_its_own_authorities_and_area_unknown_only_when_it_is(
    subs: list[Subscription], event: RoutableEvent, consented: bool
) -> None:
    consent: dict[str, Any] = {s.agency: "given" for s in subs} if consented else {}
    for decision in decide(event, subs, consent, NOW):
        theirs = [s for s in subs if s.agency == decision.agency]
        if decision.delivers:
            assert any(
                not s.condition.local_authorities or s.condition.local_authorities & event.local_authorities
                for s in theirs
            ), "delivered only where one of its authorities is the subject's"
        if decision.outcome is Outcome.WITHHELD_AREA_UNKNOWN:
            assert event.area_unknown, "area unknown only when an address could not be placed"
            assert not any(s.condition.holds_for(event) for s in theirs)
        if not event.area_unknown:
            assert decision.outcome is not Outcome.WITHHELD_AREA_UNKNOWN
