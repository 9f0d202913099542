"""The numbers of the documents an informant may give to have an organisation find a
record: a UK driving licence number (checked against the holder's surname and date of
birth, as DVLA builds it) and a UK passport number. Each check returns what is wrong,
in words an informant can act on, or ``None``."""

from __future__ import annotations

import re
from datetime import date

# DVLA's licence number, 16 characters: the surname's first five letters (9s after a
# short one), the decade digit of the year of birth, the month (plus 50 for a woman),
# the day, the year's last digit, two initials (9 for none), a digit, two check characters.
_LICENCE = re.compile(r"^[A-Z9]{5}[0-9][0156][0-9][0-3][0-9][0-9][A-Z9]{2}[0-9][A-Z0-9]{2}$")
_PASSPORT = re.compile(r"^[0-9]{9}$")
LICENCE_EXAMPLE = "MORGA753116SM9IJ"


def surname_code(family_name: str) -> str:
    """The first five characters of a licence number for this surname: its letters only,
    a leading MAC written MC, padded with 9s."""
    letters = re.sub(r"[^A-Z]", "", family_name.upper())
    if letters.startswith("MAC"):
        letters = "MC" + letters[3:]
    return (letters[:5] + "99999")[:5]


def birth_code(born: date, *, woman: bool = False) -> str:
    """Characters 6 to 11 of a licence number: the decade digit of the year of birth, the
    month (plus 50 for a woman), the day, the year's last digit."""
    year = f"{born.year:04d}"
    return f"{year[2]}{born.month + (50 if woman else 0):02d}{born.day:02d}{year[3]}"


def driving_licence_problem(number: str, family_name: str, born: date | None) -> str | None:
    if _LICENCE.fullmatch(number) is None:
        return (
            "Enter the driving licence number as it is on the licence: 16 letters and numbers,"
            f" like {LICENCE_EXAMPLE}"
        )
    if number[:5] != surname_code(family_name):
        return "The driving licence number does not match the surname registered: check the licence"
    if born is not None and number[5:11] not in (birth_code(born), birth_code(born, woman=True)):
        return "The driving licence number does not match the date of birth registered: check the licence"
    return None


def passport_problem(number: str) -> str | None:
    if _PASSPORT.fullmatch(number) is None:
        return "Enter the passport number as it is on the passport: 9 numbers, like 123456789"
    return None
