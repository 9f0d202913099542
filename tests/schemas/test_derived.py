"""Derived facts (schemas/derived.py): worked out once, from the event's own fields, by
intake when it records a death and when a correction changes what they come from; a
record whose derived facts disagree with its fields is refused."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from producers.requests import DeathRegistration
from runtime.kafka import Topics
from runtime.settings import Settings
from schemas import decode, models
from schemas.derived import DERIVED_FIELDS, age_band, age_on, derive, over_18
from tests.golden.make_vectors import EXAMPLES
from tests.support import death_registration, eventually, header, read_topic, today


@pytest.mark.parametrize(
    ("born", "day", "age", "band", "adult"),
    [
        (date(2026, 1, 10), date(2026, 6, 1), 0, "under 1", False),
        (date(2025, 6, 1), date(2026, 6, 1), 1, "1 to 14", False),
        (date(2008, 6, 2), date(2026, 6, 1), 17, "15 to 44", False),  # 18 tomorrow
        (date(2008, 6, 1), date(2026, 6, 1), 18, "15 to 44", True),
        (date(1981, 6, 2), date(2026, 6, 1), 44, "15 to 44", True),
        (date(1981, 6, 1), date(2026, 6, 1), 45, "45 to 64", True),
        (date(1952, 3, 1), date(2026, 6, 1), 74, "65 to 74", True),
        (date(1941, 3, 2), date(2026, 11, 18), 85, "85 and over", True),
        (date(2008, 2, 29), date(2026, 2, 28), 17, "15 to 44", False),  # a leap-day birthday
        (date(2008, 2, 29), date(2026, 3, 1), 18, "15 to 44", True),
    ],
)
def test_ages_and_bands_count_completed_years(
    born: date, day: date, age: int, band: str, adult: bool
) -> None:
    assert (age_on(born, day), age_band(born, day), over_18(born, day)) == (age, band, adult)


def test_a_band_before_the_birth_is_an_error() -> None:
    with pytest.raises(ValueError, match="before the birth"):
        age_band(date(2026, 1, 2), date(2026, 1, 1))


def test_facts_that_cannot_be_known_are_null() -> None:
    record = {"deceased": {"date_of_birth": None}, "date_of_death": "2026-11-18", "last_address": {}}
    assert derive("DeathRegistered", record) == {
        "deceased_age_band": None,
        "deceased_over_18": None,
        "last_address_local_authority": None,
    }
    assert derive("BirthRegistered", {"child": {}}) == {}
    assert tuple(derive("DeathRegistered", record)) == DERIVED_FIELDS["DeathRegistered"]


def test_intake_fills_in_a_deaths_derived_facts() -> None:
    body = death_registration(date_of_death="2026-11-18")
    body["deceased"]["date_of_birth"] = "1941-03-02"
    body["last_address"]["postcode"] = "LS7 3AB"
    submitted = DeathRegistration.model_validate({k: v for k, v in body.items() if k != "consents"})
    record = submitted.contract(models.Envelope.model_validate(EXAMPLES["DeathRegistered"]["envelope"]))
    assert (record.deceased_age_band, record.deceased_over_18, record.last_address_local_authority) == (
        "85 and over",
        True,
        "E08000035",
    )


def test_a_record_whose_derived_facts_disagree_with_its_fields_is_refused() -> None:
    example = EXAMPLES["DeathRegistered"]
    assert models.DeathRegistered.model_validate(example).deceased_age_band == "85 and over"
    with pytest.raises(ValidationError, match=r"derived facts disagree.*deceased_age_band"):
        models.DeathRegistered.model_validate({**example, "deceased_age_band": "45 to 64"})
    # A death recorded before derived facts existed has none, and is read as it was.
    before = {k: v for k, v in example.items() if k not in ("deceased_age_band", "deceased_over_18")}
    assert models.DeathRegistered.model_validate({**before, "last_address_local_authority": None})


@pytest.mark.integration
async def test_a_corrected_date_of_birth_corrects_the_age_band_which_is_not_correctable_itself(
    intake: httpx.AsyncClient, services: Settings
) -> None:
    died = today() - timedelta(days=2)
    body = death_registration(date_of_death=died.isoformat())
    body["deceased"]["date_of_birth"] = "1941-03-02"
    original = (await intake.post("/v1/death-registrations", json=body)).json()
    corrections = f"/v1/events/{original['reference']}/corrections"
    for field, value in (("deceased_age_band", "15 to 44"), ("deceased_over_18", False)):
        refused = await intake.post(
            corrections, json={"changes": [{"field": field, "value": value}], "reason": "younger"}
        )
        assert refused.status_code == 422 and "follows the fields it is derived from" in refused.text

    younger = died - timedelta(days=30 * 365)  # 29 or 30 at death
    answer = await intake.post(
        corrections,
        json={
            "changes": [{"field": "deceased.date_of_birth", "value": younger.isoformat()}],
            "reason": "misread",
        },
    )
    assert answer.status_code == 201, answer.text

    async def published() -> dict[str, Any] | None:
        for record in await read_topic(services, Topics(services.topic_prefix).life_events):
            if header(record, "ce_id") == answer.json()["event_id"]:
                return decode(record.value or b"")[1]
        return None

    correction = await eventually(published, timeout=30, what="the correction on the life-events topic")
    assert [(c["field"], c["new_value_json"]) for c in correction["changes"]] == [
        ("deceased.date_of_birth", f'"{younger.isoformat()}"'),
        ("deceased_age_band", '"15 to 44"'),  # not 85; still over 18, so that is unchanged
    ]
