"""Pydantic models that mirror the Avro schemas field by field.

The ``.avsc`` files are the source of truth; ``tests/schemas/test_contract_drift.py``
proves these models agree with the latest released version of each schema
(names, order, types, optionality, enum symbols). Building a record through
these models checks formats (NINO, postcode, UPRN), dates not in the future,
time zones, a birth's date and death not before birth, before it is encoded.
"""

from __future__ import annotations

from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.derived import derive
from schemas.validation import (
    AgencyCode,
    AwareDatetime,
    LocalAuthorityCode,
    Nino,
    PastDate,
    Postcode,
    Uprn,
)

CaptureChannel = Literal["DESK", "PHONE", "ONLINE", "SYSTEM", "UNKNOWN"]
ReceiptOutcome = Literal["RECEIVED", "APPLIED", "REJECTED", "UNKNOWN"]
DecisionOutcome = Literal[
    "DELIVERED",
    "WITHHELD_NO_CONSENT",
    "WITHHELD_NO_SUBSCRIPTION",
    "BLOCKED",
    "UNKNOWN",
    "WITHHELD_AREA_UNKNOWN",
    "WITHHELD_NOT_OF_INTEREST",
]
ConsentChoice = Literal["GIVEN", "REFUSED", "WITHDRAWN", "UNKNOWN"]
ConsentRecorder = Literal["INFORMANT", "CITIZEN", "PROXY", "UNKNOWN"]


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def avro(self) -> dict[str, Any]:
        """The record as fastavro writes it."""
        return self.model_dump(mode="python")


class Address(Record):
    lines: list[str] = Field(min_length=1, max_length=5)
    town: str
    postcode: Postcode
    uprn: Uprn | None = None
    local_authority: LocalAuthorityCode | None = None  # GSS code, resolved by intake from the postcode


class Person(Record):
    given_names: str
    family_name: str
    date_of_birth: PastDate | None = None


class RelatedPerson(Record):
    person: Person
    relationship: str
    nino: Nino | None = None
    address: Address | None = None


class SubjectIdentifiers(Record):
    subject_id: str
    nino: Nino | None = None


class Informant(Record):
    name: str
    relationship: str


class Provenance(Record):
    source_system: str
    recorded_by: str


class Envelope(Record):
    event_id: UUID
    reference: str
    occurred_at: AwareDatetime
    recorded_at: AwareDatetime
    subject: SubjectIdentifiers
    informant: Informant
    channel: CaptureChannel
    registration_office: str
    provenance: Provenance


class BirthRegistered(Record):
    envelope: Envelope
    child: Person
    place_of_birth: str
    registration_district: str
    parents: list[RelatedPerson]
    home_address: Address

    @model_validator(mode="after")
    def child_has_a_birth_date(self) -> BirthRegistered:
        if self.child.date_of_birth is None:
            raise ValueError("child.date_of_birth is required in a birth registration")
        return self


class DeathRegistered(Record):
    envelope: Envelope
    deceased: Person
    date_of_death: PastDate
    place_of_death: str
    last_address: Address
    surviving_partner: RelatedPerson | None = None
    next_of_kin: list[RelatedPerson] = Field(default_factory=list)
    executor: RelatedPerson | None = None
    # Derived facts (schemas/derived.py): told to an organisation instead of the values
    # they come from. All None in a death recorded before they existed.
    deceased_age_band: str | None = None
    deceased_over_18: bool | None = None
    last_address_local_authority: str | None = None

    @model_validator(mode="after")
    def death_not_before_birth(self) -> DeathRegistered:
        born = self.deceased.date_of_birth
        if born is not None and self.date_of_death < born:
            raise ValueError("date_of_death must not be before deceased.date_of_birth")
        return self

    @model_validator(mode="after")
    def derived_facts_agree(self) -> DeathRegistered:
        expected = derive("DeathRegistered", self.model_dump())
        given = {name: getattr(self, name) for name in expected}
        if any(v is not None for v in given.values()) and given != expected:
            wrong = sorted(name for name in expected if given[name] != expected[name])
            raise ValueError(f"derived facts disagree with the fields they come from: {', '.join(wrong)}")
        return self

    def with_derived_facts(self) -> DeathRegistered:
        return self.model_copy(update=derive("DeathRegistered", self.model_dump()))


class AddressChanged(Record):
    envelope: Envelope
    person: Person
    old_address: Address
    new_address: Address
    effective_date: PastDate
    moving_with: list[RelatedPerson] = Field(default_factory=list)


class FieldChange(Record):
    field: str
    new_value_json: str | None = None


class EventCorrected(Record):
    envelope: Envelope
    corrects_event_id: UUID
    corrects_reference: str
    corrected_event_type: str
    changes: list[FieldChange] = Field(min_length=1)
    reason: str
    previous_subject_id: str | None = None
    new_subject_id: str | None = None


class EventVoided(Record):
    envelope: Envelope
    voids_event_id: UUID
    voids_reference: str
    voided_event_type: str
    reason: str


class ServicesRequested(Record):
    envelope: Envelope
    requests_event_id: UUID
    requests_reference: str
    requested_event_type: str
    person: Person
    date_of_death: PastDate | None = None
    address: Address | None = None
    driving_licence_number: str | None = None
    passport_number: str | None = None
    blue_badge_number: str | None = None


class DeliveryReceipt(Record):
    event_id: UUID
    agency: AgencyCode
    outcome: ReceiptOutcome
    reason: str | None = None
    issued_at: AwareDatetime
    received_at: AwareDatetime | None = None
    duplicate: bool = False


class RoutingDecision(Record):
    event_id: UUID
    event_type: str
    agency: AgencyCode
    outcome: DecisionOutcome
    legal_basis: str | None = None
    decided_at: AwareDatetime
    fields_delivered: list[str] = Field(default_factory=list)
    fields_withheld: list[str] = Field(default_factory=list)
    subscription_version: int | None = None


class ConsentChanged(Record):
    change_id: UUID
    subject_id: str
    agency: AgencyCode
    event_type: str
    choice: ConsentChoice
    recorded_by: ConsentRecorder
    recorded_at: AwareDatetime


TOP_LEVEL_MODELS: dict[str, type[Record]] = {
    model.__name__: model
    for model in (
        BirthRegistered,
        DeathRegistered,
        AddressChanged,
        EventCorrected,
        EventVoided,
        ServicesRequested,
        DeliveryReceipt,
        RoutingDecision,
        ConsentChanged,
    )
}
