"""A new subscription as an operator states it, checked against the contract
before it reaches the database."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from router.minimise import NINO
from router.rules import Condition
from schemas.catalogue import CATALOGUE, MINIMISED
from schemas.validation import AgencyCode, LocalAuthorityCode


class SubscriptionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agency: AgencyCode
    event_type: str
    basis: Literal["statutory", "consent"]
    statute: str | None = Field(default=None, max_length=300)
    fields: list[str] = Field(min_length=1)
    # A council's: the GSS codes of its local authorities. (Postcode areas, the older kind of
    # condition, cannot be added any more: they cross council boundaries.)
    local_authorities: list[LocalAuthorityCode] = Field(default_factory=list, max_length=50)

    @field_validator("event_type")
    @classmethod
    def known_life_event(cls, value: str) -> str:
        if value not in MINIMISED:
            raise ValueError(f"must be one of {', '.join(MINIMISED)}")
        return value

    @field_validator("local_authorities", mode="before")
    @classmethod
    def upper_case_codes(cls, value: object) -> object:
        return [str(code).strip().upper() for code in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def fields_exist_and_basis_is_cited(self) -> SubscriptionRequest:
        schema = CATALOGUE.latest(self.event_type).schema
        known = {f["name"] for f in schema["fields"] if f["name"] != "envelope"} | {NINO}
        unknown = sorted(set(self.fields) - known)
        if unknown:
            raise ValueError(
                f"{self.event_type} has no field {', '.join(unknown)}; it has {', '.join(sorted(known))}"
            )
        if self.basis == "statutory" and not self.statute:
            raise ValueError("a statutory subscription must cite its statute (--statute)")
        return self

    def as_row(self) -> dict[str, Any]:
        return {
            "agency": self.agency,
            "event_type": self.event_type,
            "legal_basis": self.basis,
            "statute": self.statute,
            "fields": sorted(set(self.fields)),
            "condition": Condition(local_authorities=frozenset(self.local_authorities)).to_json(),
        }
