"""Derived facts: what an organisation can be told instead of the value a fact comes from.

A statistics office needs to know that someone aged 75 to 84 died in Leeds, not their
date of birth or their address; a service for adults needs "over 18", not a birthday.
Each derived fact is a field of the event's schema of its own (so it is granted, signed,
minimised and checked by path like any other), and its value is worked out here, once,
by a pure function of the event's other fields. Intake fills them in when it records an
event and when a correction changes what they come from; ``models`` refuses a record
whose derived facts disagree with its fields.

Only deaths have them so far:

- ``deceased_age_band``: the age at death in the Office for National Statistics' broad
  bands (``AGE_BANDS``), from ``deceased.date_of_birth`` and ``date_of_death``;
- ``deceased_over_18``: whether the deceased was 18 or over at death;
- ``last_address_local_authority``: the GSS code of the local authority of the last
  address (looked up from its postcode by intake), without the address.

A month of death is not offered: every copy's envelope says when the event occurred,
which for a death is its day, so a month would hide nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from typing import Any

# (lowest age in the band, its name), youngest first.
AGE_BANDS: tuple[tuple[int, str], ...] = (
    (0, "under 1"),
    (1, "1 to 14"),
    (15, "15 to 44"),
    (45, "45 to 64"),
    (65, "65 to 74"),
    (75, "75 to 84"),
    (85, "85 and over"),
)
DERIVED_FIELDS: Mapping[str, tuple[str, ...]] = {
    "DeathRegistered": ("deceased_age_band", "deceased_over_18", "last_address_local_authority"),
}


def age_on(born: date, day: date) -> int:
    """Completed years from ``born`` to ``day`` (someone born on 29 February turns a year
    older on 1 March in a common year)."""
    return day.year - born.year - ((day.month, day.day) < (born.month, born.day))


def age_band(born: date, day: date) -> str:
    age = age_on(born, day)
    if age < 0:
        raise ValueError("the day is before the birth")
    return [name for lowest, name in AGE_BANDS if age >= lowest][-1]


def over_18(born: date, day: date) -> bool:
    return age_on(born, day) >= 18


def _day(value: Any) -> date | None:
    if value is None or isinstance(value, date):
        return value
    return date.fromisoformat(str(value))


def derive(event_type: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """The derived facts of ``record`` (as a model dumps it, or as JSON), by field name;
    an empty dict for an event type without any."""
    if event_type != "DeathRegistered":
        return {}
    born = _day((record.get("deceased") or {}).get("date_of_birth"))
    died = _day(record.get("date_of_death"))
    band: str | None = None
    adult: bool | None = None
    if born is not None and died is not None and born <= died:
        band, adult = age_band(born, died), over_18(born, died)
    return {
        "deceased_age_band": band,
        "deceased_over_18": adult,
        "last_address_local_authority": (record.get("last_address") or {}).get("local_authority"),
    }
