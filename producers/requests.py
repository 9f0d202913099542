"""What a registrar or another system submits, validated before anything is stored.

Each submission turns itself into the contract model of its event type
(``schemas.models``); intake adds the envelope (event id, reference, times,
pseudonymous subject id, provenance). Every rule names the field it concerns.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from typing import Annotated, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from runtime.local_authorities import local_authority
from schemas import models
from schemas.validation import (
    AgencyCode,
    Nino,
    PastDate,
    Postcode,
    Text,
    Uprn,
    is_reference,
    no_control_characters,
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Address(Strict):
    lines: list[Text] = Field(min_length=1, max_length=5)
    town: Text
    postcode: Postcode
    uprn: Uprn | None = Field(default=None, description="Unique Property Reference Number, where known.")

    def contract(self) -> models.Address:
        # The authority is looked up here, never taken from the caller: it decides which
        # council is told, so a submitter cannot choose it.
        return models.Address(**self.model_dump(), local_authority=local_authority(self.postcode))


class Person(Strict):
    given_names: Text
    family_name: Text
    date_of_birth: PastDate | None = None
    nino: Nino | None = Field(default=None, description="National Insurance number, where known.")

    def contract(self) -> models.Person:
        return models.Person(**self.model_dump(exclude={"nino"}))


class RelatedPerson(Strict):
    given_names: Text
    family_name: Text
    relationship: Text
    date_of_birth: PastDate | None = None
    nino: Nino | None = None
    address: Address | None = None

    def contract(self) -> models.RelatedPerson:
        return models.RelatedPerson(
            person=models.Person(
                given_names=self.given_names, family_name=self.family_name, date_of_birth=self.date_of_birth
            ),
            relationship=self.relationship,
            nino=self.nino,
            address=self.address.contract() if self.address else None,
        )


class Informant(Strict):
    name: Text
    relationship: Text


class ConsentChoice(Strict):
    agency: AgencyCode
    choice: Literal["given", "refused"]


def _a_reference(value: str) -> str:
    value = value.upper()
    if not is_reference(value):
        raise ValueError("must be a reference number, like TUO-2026-ABCD-EFGH")
    return value


Reference = Annotated[
    str, StringConstraints(strip_whitespace=True, max_length=40), AfterValidator(_a_reference)
]
OverrideReason = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=3, max_length=500),
    AfterValidator(no_control_characters),
]


class DuplicateOverride(Strict):
    """A supervisor records a death or birth although it is already registered."""

    existing_reference: Reference = Field(
        description="The registration this one duplicates, as the 409 answer named it."
    )
    reason: OverrideReason = Field(description="Why it must be recorded again (3 to 500 characters).")


class Submission(Strict):
    """Fields common to every event type."""

    informant: Informant
    channel: Literal["desk", "phone", "online", "system"]
    registration_office: Text | None = Field(
        default=None, description="Optional: the office is the one the credentials are for."
    )
    consents: list[ConsentChoice] = Field(default_factory=list, max_length=50)

    event_type: ClassVar[str]

    @field_validator("consents")
    @classmethod
    def one_choice_per_agency(cls, value: list[ConsentChoice]) -> list[ConsentChoice]:
        agencies = [c.agency for c in value]
        if len(agencies) != len(set(agencies)):
            raise ValueError("lists an agency more than once")
        return value

    def subject(self) -> Person:
        raise NotImplementedError

    def occurred_at(self) -> datetime:
        raise NotImplementedError

    def contract(self, envelope: models.Envelope) -> models.Record:
        raise NotImplementedError


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


class DeathRegistration(Submission):
    event_type: ClassVar[str] = "DeathRegistered"
    deceased: Person
    date_of_death: PastDate
    place_of_death: Text
    last_address: Address
    surviving_partner: RelatedPerson | None = Field(default=None, description="Spouse or civil partner.")
    next_of_kin: list[RelatedPerson] = Field(default_factory=list, max_length=10)
    executor: RelatedPerson | None = None
    duplicate_override: DuplicateOverride | None = Field(
        default=None, description="Supervisors only: record it although this death is already registered."
    )

    @field_validator("date_of_death")
    @classmethod
    def death_not_before_birth(cls, value: date, info: ValidationInfo) -> date:
        deceased = info.data.get("deceased")  # validated first: it is declared first
        if deceased is not None and deceased.date_of_birth is not None and value < deceased.date_of_birth:
            raise ValueError("must not be before the deceased's date of birth")
        return value

    def subject(self) -> Person:
        return self.deceased

    def occurred_at(self) -> datetime:
        return _midnight(self.date_of_death)

    def contract(self, envelope: models.Envelope) -> models.DeathRegistered:
        return models.DeathRegistered(
            envelope=envelope,
            deceased=self.deceased.contract(),
            date_of_death=self.date_of_death,
            place_of_death=self.place_of_death,
            last_address=self.last_address.contract(),
            surviving_partner=self.surviving_partner.contract() if self.surviving_partner else None,
            next_of_kin=[p.contract() for p in self.next_of_kin],
            executor=self.executor.contract() if self.executor else None,
        ).with_derived_facts()


class BirthRegistration(Submission):
    event_type: ClassVar[str] = "BirthRegistered"
    child: Person
    place_of_birth: Text
    registration_district: Text
    parents: list[RelatedPerson] = Field(min_length=1, max_length=2)
    home_address: Address
    duplicate_override: DuplicateOverride | None = Field(
        default=None, description="Supervisors only: record it although this birth is already registered."
    )

    @field_validator("child")
    @classmethod
    def child_has_birth_date(cls, value: Person) -> Person:
        if value.date_of_birth is None:
            raise ValueError("date_of_birth is required for the child")
        return value

    @field_validator("parents")
    @classmethod
    def parents_born_before_child(
        cls, value: list[RelatedPerson], info: ValidationInfo
    ) -> list[RelatedPerson]:
        child = info.data.get("child")
        born = child.date_of_birth if child is not None else None
        for parent in value:
            if born is not None and parent.date_of_birth is not None and parent.date_of_birth >= born:
                raise ValueError("a parent's date_of_birth must be before the child's")
        return value

    def subject(self) -> Person:
        return self.child

    def occurred_at(self) -> datetime:
        assert self.child.date_of_birth is not None
        return _midnight(self.child.date_of_birth)

    def contract(self, envelope: models.Envelope) -> models.BirthRegistered:
        return models.BirthRegistered(
            envelope=envelope,
            child=self.child.contract(),
            place_of_birth=self.place_of_birth,
            registration_district=self.registration_district,
            parents=[p.contract() for p in self.parents],
            home_address=self.home_address.contract(),
        )


class AddressChange(Submission):
    event_type: ClassVar[str] = "AddressChanged"
    person: Person
    old_address: Address
    new_address: Address
    effective_date: PastDate
    moving_with: list[RelatedPerson] = Field(default_factory=list, max_length=20)

    @field_validator("new_address")
    @classmethod
    def actually_moves(cls, value: Address, info: ValidationInfo) -> Address:
        old = info.data.get("old_address")
        if old is not None and old.model_dump() == value.model_dump():
            raise ValueError("is the same as old_address")
        return value

    def subject(self) -> Person:
        return self.person

    def occurred_at(self) -> datetime:
        return _midnight(self.effective_date)

    def contract(self, envelope: models.Envelope) -> models.AddressChanged:
        return models.AddressChanged(
            envelope=envelope,
            person=self.person.contract(),
            old_address=self.old_address.contract(),
            new_address=self.new_address.contract(),
            effective_date=self.effective_date,
            moving_with=[p.contract() for p in self.moving_with],
        )
