"""A new subscription as an operator states it, checked against the contract
before it reaches the database."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from router.rules import Condition
from router.subscription_versions import Terms
from schemas.catalogue import MINIMISED
from schemas.fieldpaths import grantable_paths, split_fields
from schemas.validation import AgencyCode, LocalAuthorityCode


class UngrantablePath(ValueError):
    """A subscription names a field path its event type does not have."""


def check_paths(event_type: str, paths: list[str]) -> None:
    """Every path must be one ``schemas.fieldpaths`` defines for the event type: a field
    holding related people is granted part by part, never whole."""
    known = grantable_paths(event_type)
    unknown = sorted(set(paths) - known)
    if not unknown:
        return
    split = split_fields(event_type)
    hints = [
        f"{path} is granted part by part: name some of " + ", ".join(f"{path}.{part}" for part in split[path])
        for path in unknown
        if path in split
    ]
    raise UngrantablePath(
        f"{event_type} has no field path {', '.join(unknown)}"
        + (f" ({'; '.join(hints)})" if hints else f"; it has {', '.join(sorted(known))}")
    )


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
    # Only the people the agency registered an interest in (`tuo agencies interest`).
    registered_subjects: bool = False
    # The agreement's validity: events decided before or after it are withheld.
    valid_from: AwareDatetime | None = None
    valid_to: AwareDatetime | None = None
    active: bool = True

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
        check_paths(self.event_type, self.fields)
        if self.basis == "statutory" and not self.statute:
            raise ValueError("a statutory subscription must cite its statute (--statute)")
        if self.basis == "consent" and self.statute:
            raise ValueError("a statute is cited only for a statutory basis")
        if self.valid_from and self.valid_to and self.valid_to <= self.valid_from:
            raise ValueError("the validity must end after it starts")
        return self

    def terms(self) -> Terms:
        return Terms(
            legal_basis=self.basis,
            statute=self.statute,
            fields=frozenset(self.fields),
            condition=Condition(
                local_authorities=frozenset(self.local_authorities),
                registered_subjects=self.registered_subjects,
            ),
            valid_from=self.valid_from,
            valid_to=self.valid_to,
            status="active" if self.active else "suspended",
        )

    def as_row(self) -> dict[str, Any]:
        return {
            "agency": self.agency,
            "event_type": self.event_type,
            "legal_basis": self.basis,
            "statute": self.statute,
            "fields": sorted(set(self.fields)),
            "condition": Condition(
                local_authorities=frozenset(self.local_authorities),
                registered_subjects=self.registered_subjects,
            ).to_json(),
        }
