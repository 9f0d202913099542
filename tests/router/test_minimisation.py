"""Data minimisation by field path: an agency's copy carries no value outside the
paths it is granted — not a partner's NINO when granted the partner's name, not the
informant, not who recorded the event.

The oracle below walks a decoded record on its own, leaf by leaf, knowing nothing
of the minimiser; the unit property runs it over random events and random grants,
and the integration test over every message the real bus sends to every agency."""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Iterator, Mapping
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.messages import disclosed_items
from router.minimise import Copies, disclosed, event_fields, minimise, splice, valued_items
from router.seed import BadSeed, read_seed
from router.subscription_request import SubscriptionRequest
from runtime.kafka import Topics
from runtime.settings import Settings
from schemas import decode, encode
from schemas.catalogue import MINIMISED, active
from schemas.codec import schema_id_of
from schemas.signatures import office_source, read_signature, signature_headers, verify
from schemas.spans import NotSpliceable, Spans, locate
from tests.golden.make_vectors import EXAMPLES
from tests.schemas.test_signatures import KEY, OFFICE
from tests.support import eventually, header, random_nino, read_topic, today

MIGRATION = Path(__file__).resolve().parents[2] / "runtime" / "migrations" / "0022_field_path_grants.sql"

# The envelope's members that every agency receives, and its personal ones with the
# path that grants each. Written out here, not taken from the code under test.
ENVELOPE_ALWAYS = {
    "envelope.event_id",
    "envelope.reference",
    "envelope.occurred_at",
    "envelope.recorded_at",
    "envelope.subject.subject_id",
    "envelope.channel",
    "envelope.registration_office",
    "envelope.provenance.source_system",
}
ENVELOPE_PERSONAL = {
    "envelope.subject.nino": "nino",
    "envelope.informant.name": "informant.name",
    "envelope.informant.relationship": "informant.relationship",
    "envelope.provenance.recorded_by": "recorded_by",
}


def leaves(value: Any, path: str = "") -> Iterator[str]:
    """The dotted path of every non-null leaf value (list indices dropped)."""
    if isinstance(value, Mapping):
        for key, member in value.items():
            yield from leaves(member, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for element in value:
            yield from leaves(element, path)
    elif value is not None:
        yield path


def outside_grant(record: Mapping[str, Any], granted: frozenset[str]) -> list[str]:
    """Every leaf of a delivered record that no grant covers."""
    found = []
    for leaf in leaves({k: v for k, v in record.items() if k != "withheld_fields"}):
        if leaf in ENVELOPE_ALWAYS:
            continue
        grant_path = ENVELOPE_PERSONAL.get(leaf, leaf)
        if leaf.startswith("envelope.") and leaf not in ENVELOPE_PERSONAL:
            found.append(leaf)  # a member of the envelope this oracle does not know
        elif not any(grant_path == g or grant_path.startswith(g + ".") for g in granted):
            found.append(leaf)
    return found


def test_the_oracle_finds_what_the_old_minimiser_leaked() -> None:
    """A grant of the partner's name does not cover their NINO or the informant."""
    record = copy.deepcopy(EXAMPLES["DeathRegistered"])
    assert set(outside_grant(record, frozenset({"deceased", "surviving_partner.person"}))) >= {
        "surviving_partner.nino",
        "surviving_partner.address.postcode",
        "envelope.informant.name",
        "envelope.provenance.recorded_by",
        "envelope.subject.nino",
    }
    assert outside_grant(record, event_fields("DeathRegistered")) == []


_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
_address = st.fixed_dictionaries(
    {
        "lines": st.lists(_text, min_size=1, max_size=2),
        "town": _text,
        "postcode": _text,
        "uprn": st.none() | _text,
    }
)
_person = st.fixed_dictionaries(
    {
        "given_names": _text,
        "family_name": _text,
        "date_of_birth": st.none() | st.dates(max_value=date(2026, 1, 1)),
    }
)
_related = st.fixed_dictionaries(
    {"person": _person, "relationship": _text, "nino": st.none() | _text, "address": st.none() | _address}
)


@st.composite
def life_events(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A random event of an agency-facing type, every optional part maybe filled."""
    event_type = draw(st.sampled_from(MINIMISED))
    record = copy.deepcopy(EXAMPLES[event_type])
    record["envelope"] = {
        **record["envelope"],
        "event_id": str(uuid.uuid4()),
        "registration_office": OFFICE,
        "subject": {"subject_id": draw(_text), "nino": draw(st.none() | _text)},
        "informant": {"name": draw(_text), "relationship": draw(_text)},
    }
    people = {
        "DeathRegistered": {"surviving_partner": "one", "executor": "one", "next_of_kin": "many"},
        "BirthRegistered": {"parents": "many"},
        "AddressChanged": {"moving_with": "many"},
        "ServicesRequested": {},
    }[event_type]
    if event_type == "ServicesRequested":  # each service's details, and the death, maybe absent
        for name in ("driving_licence_number", "passport_number", "blue_badge_number"):
            record[name] = draw(st.none() | _text)
        record["date_of_death"] = draw(st.none() | st.just(record["date_of_death"]))
        record["address"] = draw(st.none() | st.just(record["address"]))
    for name, kind in people.items():
        if kind == "one":
            record[name] = draw(st.none() | _related)
        else:
            record[name] = draw(st.lists(_related, min_size=1 if name == "parents" else 0, max_size=3))
    return event_type, record


@given(event=life_events(), data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_no_value_outside_the_grant_reaches_an_agency_and_what_does_verifies(
    event: tuple[str, dict[str, Any]], data: st.DataObject
) -> None:
    event_type, record = event
    granted = frozenset(data.draw(st.lists(st.sampled_from(sorted(event_fields(event_type))), unique=True)))
    event_id = record["envelope"]["event_id"]
    headers = signature_headers(KEY.signing, event_type, record, event_id)
    copy_ = minimise(event_type, decode(encode(event_type, record))[1], granted)
    value = encode(f"{event_type}Disclosure", copy_)
    _, delivered = decode(value)
    assert outside_grant(delivered, granted) == []
    verify(
        read_signature(read_signature(headers).headers(disclose=disclosed_items(event_type, copy_))),
        KEY.published,
        event_type=event_type,
        event_id=event_id,
        source=office_source(OFFICE),
        body=delivered,
    )
    # Nothing granted is lost: every granted leaf with a value in the event is in the copy.
    for leaf in leaves(decode(encode(event_type, record))[1]):
        grant = ENVELOPE_PERSONAL.get(leaf, leaf)
        if any(grant == g or grant.startswith(g + ".") for g in granted):
            assert leaf in set(leaves(delivered)), f"{leaf} was granted but not delivered"


def test_a_subscription_must_name_a_related_persons_parts() -> None:
    with pytest.raises(
        ValueError, match=r"surviving_partner is granted part by part.*surviving_partner\.nino"
    ):
        SubscriptionRequest(
            agency="council-york", event_type="DeathRegistered", basis="consent", fields=["surviving_partner"]
        )
    with pytest.raises(ValueError, match="no field path informant"):
        SubscriptionRequest(
            agency="council-york", event_type="DeathRegistered", basis="consent", fields=["informant"]
        )
    granted = SubscriptionRequest(
        agency="council-york",
        event_type="DeathRegistered",
        basis="consent",
        fields=["surviving_partner.person", "informant.name"],
    )
    assert granted.as_row()["fields"] == ["informant.name", "surviving_partner.person"]


# --- the real bus -----------------------------------------------------------------------------


def _related_in(town: str, postcode: str, relationship: str) -> dict[str, Any]:
    return {
        "given_names": "Rel",
        "family_name": f"Ative-{relationship}",
        "relationship": relationship,
        "date_of_birth": "1960-05-05",
        "nino": random_nino(),
        "address": {
            "lines": [f"2 {relationship} Road"],
            "town": town,
            "postcode": postcode,
            "uprn": "100012345678",
        },
    }


def _registrations() -> dict[str, tuple[str, dict[str, Any]]]:
    informant = {"name": "Ina Formant", "relationship": "daughter"}
    home = {"lines": ["1 Full Street"], "town": "Leeds", "postcode": "LS1 1AA", "uprn": "100012345679"}
    return {
        "DeathRegistered": (
            "/v1/death-registrations",
            {
                "informant": informant,
                "channel": "desk",
                "deceased": {
                    "given_names": "Full",
                    "family_name": "Fields",
                    "date_of_birth": "1941-03-02",
                    "nino": random_nino(),
                },
                "date_of_death": (today() - timedelta(days=2)).isoformat(),
                "place_of_death": "Leeds General Infirmary",
                "last_address": home,
                "surviving_partner": _related_in("Leeds", "LS1 1AA", "wife"),
                "next_of_kin": [
                    _related_in("York", "YO1 7HH", "son"),
                    _related_in("Hull", "HU1 1AA", "daughter"),
                ],
                "executor": _related_in("Bradford", "BD1 1AA", "solicitor"),
                "consents": [{"agency": "dvla", "choice": "given"}, {"agency": "hmpo", "choice": "given"}],
            },
        ),
        "BirthRegistered": (
            "/v1/birth-registrations",
            {
                "informant": informant,
                "channel": "desk",
                "child": {
                    "given_names": "Baby",
                    "family_name": "Fields",
                    "date_of_birth": (today() - timedelta(days=3)).isoformat(),
                },
                "place_of_birth": "St James's University Hospital",
                "registration_district": "Leeds",
                "parents": [
                    _related_in("Leeds", "LS1 1AA", "mother"),
                    _related_in("Leeds", "LS1 1AA", "father"),
                ],
                "home_address": home,
            },
        ),
        "AddressChanged": (
            "/v1/address-changes",
            {
                "informant": {"name": "Mo Ver", "relationship": "self"},
                "channel": "online",
                "person": {
                    "given_names": "Mo",
                    "family_name": "Ver",
                    "date_of_birth": "1980-01-01",
                    "nino": random_nino(),
                },
                "old_address": home,
                "new_address": {"lines": ["9 New Street"], "town": "Leeds", "postcode": "LS6 2AB"},
                "effective_date": (today() - timedelta(days=1)).isoformat(),
                "moving_with": [
                    _related_in("Leeds", "LS1 1AA", "partner"),
                    _related_in("Leeds", "LS1 1AA", "child"),
                ],
                "consents": [
                    {"agency": "hmrc", "choice": "given"},
                    {"agency": "dvla", "choice": "given"},
                    {"agency": "council-leeds", "choice": "given"},
                ],
            },
        ),
    }


@pytest.mark.integration
async def test_every_agency_message_carries_only_its_granted_paths(
    intake: httpx.AsyncClient, pool: asyncpg.Pool, services: Settings
) -> None:
    accepted: dict[str, str] = {}
    for event_type, (url, body) in _registrations().items():
        response = await intake.post(url, json=body)
        assert response.status_code == 201, response.text
        accepted[response.json()["event_id"]] = event_type
    topics = Topics(services.topic_prefix)
    grants = {
        (r["agency"], r["event_type"]): frozenset(r["fields"])
        for r in await pool.fetch(
            "SELECT agency, event_type, fields FROM subscription WHERE status = 'active'"
        )
    }

    async def delivered() -> dict[str, list[Any]] | None:
        decided = await pool.fetch(
            "SELECT event_id::text AS event_id, agency FROM routing_decision"
            " WHERE event_id = ANY($1::uuid[]) AND outcome = 'DELIVERED'",
            list(accepted),
        )
        if {r["event_id"] for r in decided} != set(accepted):
            return None
        found: dict[str, list[Any]] = {}
        for agency in {r["agency"] for r in decided}:
            found[agency] = [
                r for r in await read_topic(services, topics.agency(agency)) if header(r, "ce_id") in accepted
            ]
        if sum(len(v) for v in found.values()) < len(decided):
            return None
        return found

    messages = await eventually(delivered, timeout=90, what="every delivery of the three events")
    assert {"hmrc", "dwp", "dvla", "hmpo", "council-leeds", "ons"} <= set(messages), "many agencies"
    checked = 0
    for agency, records in messages.items():
        for message in records:
            event_type = accepted[header(message, "ce_id") or ""]
            name, record = decode(message.value or b"")
            assert name == f"{event_type}Disclosure"
            granted = grants[(agency, event_type)]
            assert outside_grant(record, granted) == [], f"{agency} got more of a {event_type} than granted"
            assert set(record["withheld_fields"]) == event_fields(event_type) - granted
            checked += 1
    assert checked >= 7
    council_death = next(
        decode(m.value or b"")[1]
        for m in messages["council-leeds"]
        if accepted[header(m, "ce_id") or ""] == "DeathRegistered"
    )
    partner = council_death["surviving_partner"]
    assert partner["person"]["family_name"] == "Ative-wife", "the partner's name, which the council needs"
    assert partner["nino"] is None and partner["address"] is None, "not the partner's NINO or address"
    assert council_death["envelope"]["informant"]["name"] is None, "not the informant"
    # The statistics office is told derived facts only: an age band, not a date of birth.
    [ons_death] = [decode(m.value or b"")[1] for m in messages["ons"]]
    born, died = date(1941, 3, 2), today() - timedelta(days=2)
    age = died.year - 1941 - ((died.month, died.day) < (3, 2))  # written out, not derived.age_on
    assert age >= 85 and ons_death["deceased_age_band"] == "85 and over"
    assert ons_death["last_address_local_authority"] == "E08000035"  # Leeds, for LS1 1AA
    assert ons_death["deceased"] is None and ons_death["last_address"] is None
    assert not [leaf for leaf in leaves(ons_death) if "date_of_birth" in leaf or "nino" in leaf]
    assert born.isoformat() not in json.dumps(ons_death, default=str), "no date of birth, in any form"
    assert "deceased" in ons_death["withheld_fields"] and "deceased_over_18" in ons_death["withheld_fields"]
    dwp_birth = next(
        decode(m.value or b"")[1]
        for m in messages["dwp"]
        if accepted[header(m, "ce_id") or ""] == "BirthRegistered"
    )
    assert all(p["nino"] for p in dwp_birth["parents"]) and all(
        p["address"] is None for p in dwp_birth["parents"]
    )


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        (["deceased"], "fields must map each granted path to why"),
        ({"deceased": ""}, "deceased needs a reason"),
        ({"surviving_partner": "to apply a discount"}, "surviving_partner is granted part by part"),
        ({"<script>": "to be hostile"}, "no field path <script>"),
    ],
)
def test_a_seed_without_a_reason_or_with_an_unknown_path_is_refused(
    tmp_path: Path, fields: Any, complaint: str
) -> None:
    seed = tmp_path / "seed.json"
    item = {
        "agency": "council-york",
        "event_type": "DeathRegistered",
        "legal_basis": "consent",
        "fields": fields,
    }
    seed.write_text(json.dumps({"subscriptions": [item]}))
    with pytest.raises(BadSeed, match=re.escape(complaint)):
        read_seed(seed)


def test_every_seed_subscription_gives_a_reason_for_each_path() -> None:
    for item in read_seed():
        assert item["fields"] and all(len(reason) > 10 for reason in item["fields"].values()), item["agency"]


@pytest.mark.integration
async def test_a_whole_related_person_granted_before_paths_is_spelled_out_part_by_part(
    pool: asyncpg.Pool,
) -> None:
    """Migration 0022 keeps what an old subscription delivered, but names each part."""
    agency = f"old-{uuid.uuid4().hex[:8]}"
    await pool.execute(
        "INSERT INTO subscription (agency, event_type, legal_basis, fields, status)"
        " VALUES ($1, 'DeathRegistered', 'consent', $2, 'suspended')",
        agency,
        ["deceased", "surviving_partner", "nino"],
    )
    try:
        await pool.execute(MIGRATION.read_text())
        fields = await pool.fetchval("SELECT fields FROM subscription WHERE agency = $1", agency)
        assert fields == [
            "deceased",
            "nino",
            "surviving_partner.address",
            "surviving_partner.nino",
            "surviving_partner.person",
            "surviving_partner.relationship",
        ]
    finally:
        await pool.execute("DELETE FROM subscription WHERE agency = $1", agency)


@given(event=life_events(), data=st.data())
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_copies_that_share_fields_are_the_bytes_each_would_be_alone(
    event: tuple[str, dict[str, Any]], data: st.DataObject
) -> None:
    """The router encodes a field once per distinct cut of it and splices each agency's
    copy from those bytes, and names the items it discloses from the cut: each copy must be
    exactly the copy minimised and encoded alone, disclosing exactly what that one carries."""
    event_type, record = event
    body = decode(encode(event_type, record))[1]
    paths = sorted(event_fields(event_type))
    grants = data.draw(st.lists(st.frozensets(st.sampled_from(paths)), min_size=1, max_size=6))
    copies = Copies(event_type, body)
    for granted in grants:
        values, value = copies.copy(granted)
        alone = minimise(event_type, body, granted)
        assert values == alone
        assert value == encode(f"{event_type}Disclosure", alone)
        assert copies.disclosed(granted) == disclosed_items(event_type, alone)


@given(event=life_events(), data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_copy_spliced_from_the_stored_bytes_is_the_copy_minimised_and_encoded(
    event: tuple[str, dict[str, Any]], data: st.DataObject
) -> None:
    """Replay cuts each agency's copy from the event's stored bytes, located once when it
    was recorded (``schemas.spans``): for any event and any grant, the spliced copy must be
    byte for byte the copy minimised and encoded, and disclose what that copy carries."""
    event_type, record = event
    value = encode(event_type, record)
    body = decode(value)[1]
    spans = Spans.from_json(json.loads(json.dumps(locate(event_type, value).as_json())))
    valued = valued_items(event_type, body)
    paths = sorted(event_fields(event_type))
    routers = Copies(event_type, body, value)  # the router's, given the event's bytes too
    for granted in data.draw(st.lists(st.frozensets(st.sampled_from(paths)), min_size=1, max_size=6)):
        alone = minimise(event_type, body, granted)
        encoded = encode(f"{event_type}Disclosure", alone)
        assert splice(event_type, value, spans, granted) == encoded
        assert routers.encoded(granted) == encoded
        assert disclosed(event_type, granted, valued) == disclosed_items(event_type, alone)


def test_bytes_that_are_not_the_latest_schema_or_whole_are_not_spliced() -> None:
    """An event written with an older schema version, cut short or with bytes after its
    end is copied the slow way (decoded, minimised, encoded), never spliced wrongly."""
    record = {**EXAMPLES["DeathRegistered"], "envelope": {**EXAMPLES["DeathRegistered"]["envelope"]}}
    value = encode("DeathRegistered", record)
    older = min(e.schema_id for e in active().versions("DeathRegistered"))
    assert older != schema_id_of(value)
    with pytest.raises(NotSpliceable, match="not DeathRegistered's latest"):
        locate("DeathRegistered", value[:1] + older.to_bytes(4, "big") + value[5:])
    with pytest.raises(NotSpliceable, match="ends early"):
        locate("DeathRegistered", value[:-3])
    with pytest.raises(NotSpliceable, match="bytes after its last field"):
        locate("DeathRegistered", value + b"\x00")
