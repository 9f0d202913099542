"""Intake validation, without a server: normalisation and field-level messages."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from producers.requests import Address, DeathRegistration, Person
from tests.support import death_registration


def _errors(body: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationError) as caught:
        DeathRegistration.model_validate(body)
    return {".".join(str(p) for p in e["loc"]): e["msg"] for e in caught.value.errors()}


def test_postcode_and_nino_are_normalised() -> None:
    assert Address(lines=["1 Street"], town="Leeds", postcode="ls11aa").postcode == "LS1 1AA"
    assert Person(given_names="A", family_name="B", nino="ab 12 34 56 c").nino == "AB123456C"


@pytest.mark.parametrize("nino", ["AB123456", "GB123456A", "AD123456A", "AB1234567A", "12345678A"])
def test_implausible_ninos_are_refused(nino: str) -> None:
    with pytest.raises(ValidationError, match="National Insurance number"):
        Person(given_names="A", family_name="B", nino=nino)


def test_avro_person_never_carries_the_nino() -> None:
    person = Person(given_names="A", family_name="B", nino="AB123456C")
    assert "nino" not in person.contract().avro()


def test_birth_date_in_the_future_is_refused_by_field() -> None:
    body = death_registration(
        deceased={"given_names": "A", "family_name": "B", "date_of_birth": "2999-01-01"}
    )
    assert "future" in _errors(body)["deceased.date_of_birth"]


def test_every_error_of_a_submission_is_reported_at_once() -> None:
    body = death_registration(channel="fax", place_of_death="")
    body.pop("informant")
    assert {"channel", "place_of_death", "informant"} <= set(_errors(body))


def test_contract_models_refuse_a_birth_without_a_date_and_a_death_before_birth() -> None:
    from datetime import date

    from schemas import models
    from tests.golden.make_vectors import EXAMPLES

    birth = {**EXAMPLES["BirthRegistered"], "child": {"given_names": "A", "family_name": "B"}}
    with pytest.raises(ValidationError, match=r"child\.date_of_birth is required"):
        models.BirthRegistered.model_validate(birth)
    death = {**EXAMPLES["DeathRegistered"], "date_of_death": date(1900, 1, 1)}
    with pytest.raises(ValidationError, match=r"must not be before deceased\.date_of_birth"):
        models.DeathRegistered.model_validate(death)
    assert models.DeathRegistered.model_validate(EXAMPLES["DeathRegistered"]).deceased.family_name
