"""Reading what an agency was delivered: the fields it was granted, as typed values.

When a field the agency needs was withheld (its subscription does not grant it)
or does not hold a valid value, these raise ``RejectEvent`` with a reason that
names the field in plain words and quotes none of its value: reasons reach the
registrar and the citizen, and must carry no personal data.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import date
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from consumers.sdk import DeliveredEvent, RejectEvent
from schemas import models

M = TypeVar("M", bound=BaseModel)

# How a reason names each field.
_DESCRIBED = {
    "deceased": "deceased's name",
    "date_of_death": "date of death",
    "last_address": "last address",
    "person": "person's name",
    "old_address": "previous address",
    "new_address": "new address",
    "effective_date": "date of the move",
    "voids_event_id": "voided event's id",
    "voided_event_type": "voided event's type",
    "corrects_event_id": "corrected event's id",
    "corrected_event_type": "corrected event's type",
    "requested_event_type": "type of registration the request follows",
}


def _described(field: str) -> str:
    return _DESCRIBED.get(field, field.replace("_", " "))


def nino(event: DeliveredEvent) -> str:
    """The subject's National Insurance number, which only some subscriptions grant."""
    value = event.record["envelope"]["subject"].get("nino")
    if not isinstance(value, str) or not value:
        raise RejectEvent("the National Insurance number was not delivered")
    return value


def event_uuid(event: DeliveredEvent) -> uuid.UUID:
    return uuid.UUID(event.event_id)


def _granted(event: DeliveredEvent, field: str) -> Any:
    value = event.record.get(field)
    if value is None:
        raise RejectEvent(f"the {_described(field)} was not delivered")
    return value


def _model(field: str, value: Any, model: type[M]) -> M:
    try:
        return model.model_validate(value)
    except ValidationError:
        raise RejectEvent(f"the {_described(field)} delivered is not valid") from None


def person(event: DeliveredEvent, field: str) -> models.Person:
    return _model(field, _granted(event, field), models.Person)


def address(event: DeliveredEvent, field: str) -> models.Address:
    return _model(field, _granted(event, field), models.Address)


def address_if_delivered(event: DeliveredEvent, field: str) -> models.Address | None:
    value = event.record.get(field)
    return None if value is None else _model(field, value, models.Address)


def day(event: DeliveredEvent, field: str) -> date:
    value = _granted(event, field)
    if not isinstance(value, date):
        raise RejectEvent(f"the {_described(field)} delivered is not a date")
    return value


def text(event: DeliveredEvent, field: str) -> str:
    value = _granted(event, field)
    if not isinstance(value, str) or not value.strip():
        raise RejectEvent(f"the {_described(field)} delivered is empty")
    return value


def companions(event: DeliveredEvent, field: str = "moving_with") -> list[models.Person]:
    """The people named in a list of related people (those moving with someone);
    none when the list, or the people in it (``<field>.person``), were withheld."""
    related = event.record.get(field) or []
    if not isinstance(related, list) or not all(isinstance(r, dict) for r in related):
        raise RejectEvent(f"the {_described(field)} delivered is not a list of people")
    return [_model(field, r["person"], models.Person) for r in related if r.get("person") is not None]


def voided(event: DeliveredEvent) -> tuple[uuid.UUID, str]:
    """What an ``EventVoided`` voids: (the earlier event's id, its type)."""
    return (
        uuid.UUID(str(_granted(event, "voids_event_id"))),
        str(_granted(event, "voided_event_type")),
    )


def corrected(event: DeliveredEvent) -> tuple[uuid.UUID, str]:
    """What an ``EventCorrected`` corrects: (the earlier event's id, its type)."""
    return (
        uuid.UUID(str(_granted(event, "corrects_event_id"))),
        str(_granted(event, "corrected_event_type")),
    )


@dataclass(frozen=True)
class NinoCorrection:
    nino: str | None  # None: the NINO was removed (it was not the subject's, and theirs is unknown)


def nino_correction(event: DeliveredEvent) -> NinoCorrection | None:
    """The subject's NINO as an ``EventCorrected`` sets it; None when the correction
    does not change it, or did not deliver it (only agencies granted the NINO are
    told of its correction)."""
    for change in event.record.get("changes") or []:
        if isinstance(change, dict) and change.get("field") == "nino":
            try:
                value = json.loads(change.get("new_value_json") or "null")
            except ValueError:
                raise RejectEvent("the corrected National Insurance number is not valid") from None
            if value is not None and not isinstance(value, str):
                raise RejectEvent("the corrected National Insurance number is not valid")
            return NinoCorrection(value)
    return None
