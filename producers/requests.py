"""What a registrar or another system submits, validated before anything is stored.

Each model turns itself into the Avro record of its event type. The envelope
(event id, reference, times, subject id, provenance) is filled in by intake.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

# Printable text without control characters; generous but bounded.
Text = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$"),
]
AgencyCode = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{1,39}$")]

_NINO = re.compile(r"^(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z][0-9]{6}[A-D]$")
_POSTCODE = re.compile(r"^[A-Z]{1,2}[0-9][A-Z0-9]? ?[0-9][A-Z]{2}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


def _not_in_future(value: date) -> date:
    if value > datetime.now(UTC).date():
        raise ValueError("must not be in the future")
    return value


class Address(Strict):
    lines: list[Text] = Field(min_length=1, max_length=5)
    town: Text
    postcode: Annotated[str, StringConstraints(max_length=10)]
    uprn: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,12}$")] | None = None

    @field_validator("postcode")
    @classmethod
    def uk_postcode(cls, value: str) -> str:
        normalised = value.upper().replace(" ", "")
        if not _POSTCODE.match(normalised):
            raise ValueError("must be a UK postcode, like SW1A 1AA")
        return f"{normalised[:-3]} {normalised[-3:]}"

    def avro(self) -> dict[str, Any]:
        return self.model_dump()


class Person(Strict):
    given_names: Text
    family_name: Text
    date_of_birth: date | None = None
    nino: Annotated[str, StringConstraints(max_length=13)] | None = Field(
        default=None, description="National Insurance number, where known."
    )

    @field_validator("date_of_birth")
    @classmethod
    def birth_not_in_future(cls, value: date | None) -> date | None:
        return None if value is None else _not_in_future(value)

    @field_validator("nino")
    @classmethod
    def valid_nino(cls, value: str | None) -> str | None:
        if value is None:
            return None
        normalised = value.upper().replace(" ", "")
        if not _NINO.match(normalised):
            raise ValueError("must be a National Insurance number, like AB 12 34 56 C")
        return normalised

    def avro(self) -> dict[str, Any]:
        return self.model_dump(exclude={"nino"})


class Informant(Strict):
    name: Text
    relationship: Text


class ConsentChoice(Strict):
    agency: AgencyCode
    choice: Literal["given", "refused"]


class Submission(Strict):
    """Fields common to every event type."""

    informant: Informant
    channel: Literal["desk", "phone", "online", "system"]
    registration_office: Text
    consents: list[ConsentChoice] = Field(default_factory=list, max_length=50)

    @field_validator("consents")
    @classmethod
    def one_choice_per_agency(cls, value: list[ConsentChoice]) -> list[ConsentChoice]:
        agencies = [c.agency for c in value]
        if len(agencies) != len(set(agencies)):
            raise ValueError("lists an agency more than once")
        return value

    event_type: ClassVar[str]

    def subject(self) -> Person:
        raise NotImplementedError

    def occurred_at(self) -> datetime:
        raise NotImplementedError

    def body(self) -> dict[str, Any]:
        raise NotImplementedError


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


class DeathRegistration(Submission):
    event_type: ClassVar[str] = "DeathRegistered"
    deceased: Person
    date_of_death: date
    place_of_death: Text
    last_address: Address

    @field_validator("date_of_death")
    @classmethod
    def death_not_in_future_nor_before_birth(cls, value: date, info: ValidationInfo) -> date:
        deceased = info.data.get("deceased")  # validated first: it is declared first
        if deceased is not None and deceased.date_of_birth is not None and value < deceased.date_of_birth:
            raise ValueError("must not be before the deceased's date of birth")
        return _not_in_future(value)

    def subject(self) -> Person:
        return self.deceased

    def occurred_at(self) -> datetime:
        return _midnight(self.date_of_death)

    def body(self) -> dict[str, Any]:
        return {
            "deceased": self.deceased.avro(),
            "date_of_death": self.date_of_death,
            "place_of_death": self.place_of_death,
            "last_address": self.last_address.avro(),
        }


class BirthRegistration(Submission):
    event_type: ClassVar[str] = "BirthRegistered"
    child: Person
    place_of_birth: Text
    parents: list[Person] = Field(min_length=1, max_length=2)
    home_address: Address

    @field_validator("child")
    @classmethod
    def child_has_birth_date(cls, value: Person) -> Person:
        if value.date_of_birth is None:
            raise ValueError("child.date_of_birth is required")
        return value

    def subject(self) -> Person:
        return self.child

    def occurred_at(self) -> datetime:
        assert self.child.date_of_birth is not None
        return _midnight(self.child.date_of_birth)

    def body(self) -> dict[str, Any]:
        return {
            "child": self.child.avro(),
            "place_of_birth": self.place_of_birth,
            "parents": [p.avro() for p in self.parents],
            "home_address": self.home_address.avro(),
        }


class AddressChange(Submission):
    event_type: ClassVar[str] = "AddressChanged"
    person: Person
    old_address: Address
    new_address: Address
    effective_date: date

    def subject(self) -> Person:
        return self.person

    def occurred_at(self) -> datetime:
        return _midnight(self.effective_date)

    def body(self) -> dict[str, Any]:
        return {
            "person": self.person.avro(),
            "old_address": self.old_address.avro(),
            "new_address": self.new_address.avro(),
            "effective_date": self.effective_date,
        }
