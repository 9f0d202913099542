"""Field types with their validation rules, shared by the contract models and intake.

Each rule fails with a message that says what is wrong and shows a valid example;
pydantic adds which field.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated
from zoneinfo import ZoneInfo

from pydantic import AfterValidator, StringConstraints

# The NINO rules published by HMRC: no D, F, I, Q, U or V in either prefix letter,
# no O as the second letter, and prefixes BG, GB, KN, NK, NT, TN and ZZ never issued.
_NINO = re.compile(r"^(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z][0-9]{6}[A-D]$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UPRN = re.compile(r"^[0-9]{1,12}$")
_AGENCY = re.compile(r"^[a-z][a-z0-9-]{1,39}$")
# A reference number: TUO-<year>-XXXX-XXXX in Crockford's base32 without I, L, O and U,
# so that it is unambiguous when read out over the phone. The one pattern everything checks.
REFERENCE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_REFERENCE = re.compile(rf"TUO-[0-9]{{4}}-[{REFERENCE_ALPHABET}]{{4}}-[{REFERENCE_ALPHABET}]{{4}}", re.ASCII)


def as_printed(typed: str) -> str:
    """A reference or a document number as printed, whatever the case and spacing typed."""
    return re.sub(r"\s+", "", typed).upper()


def is_reference(text: str) -> bool:
    """Whether ``text`` is spelled as a reference number (upper case, as issued)."""
    return _REFERENCE.fullmatch(text) is not None


# An ONS GSS code of a local authority: the nation's letter and eight digits (E08000035,
# Leeds); L99999999 and M99999999 are the ONS pseudo-codes of the Channel Islands and Man.
_GSS_CODE = re.compile(r"^[ENSWLM][0-9]{8}$")
# UK postcode shape (outward code, space, inward code); BFPO and overseas codes are out of scope.
_POSTCODE = re.compile(r"^[A-Z]{1,2}[0-9][A-Z0-9]? [0-9][ABD-HJLNP-UW-Z]{2}$")


def normalise_nino(value: str) -> str:
    normalised = value.upper().replace(" ", "")
    if not _NINO.match(normalised):
        raise ValueError("must be a National Insurance number, like AB 12 34 56 C")
    return normalised


def normalise_postcode(value: str) -> str:
    compact = value.upper().replace(" ", "")
    normalised = f"{compact[:-3]} {compact[-3:]}"
    if len(compact) < 5 or not _POSTCODE.match(normalised):
        raise ValueError("must be a UK postcode, like SW1A 1AA")
    return normalised


def valid_gss_code(value: str) -> str:
    if not _GSS_CODE.match(value):
        raise ValueError("must be a local authority's GSS code, like E08000035")
    return value


def no_control_characters(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters (such as tabs, new lines or escapes)")
    return value


def valid_uprn(value: str) -> str:
    if not _UPRN.match(value):
        raise ValueError("must be a UPRN: 1 to 12 digits, like 100023336956")
    return value


def valid_agency_code(value: str) -> str:
    if not _AGENCY.match(value):
        raise ValueError("must be an agency code: lower-case letters, digits and hyphens, like council-leeds")
    return value


UK = ZoneInfo("Europe/London")


def today_in_the_uk() -> date:
    # Not the UTC date: from midnight to 01:00 in British Summer Time it is still yesterday.
    return datetime.now(UK).date()


def not_in_future(value: date) -> date:
    if value > today_in_the_uk():
        raise ValueError("must not be in the future")
    return value


def timezone_aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("must include a time zone, like 2026-11-21T09:30:00Z")
    return value


# Printable text without control characters; generous but bounded.
Text = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    AfterValidator(no_control_characters),
]
Nino = Annotated[str, StringConstraints(max_length=13), AfterValidator(normalise_nino)]
Postcode = Annotated[str, StringConstraints(max_length=10), AfterValidator(normalise_postcode)]
Uprn = Annotated[str, AfterValidator(valid_uprn)]
PastDate = Annotated[date, AfterValidator(not_in_future)]
AwareDatetime = Annotated[datetime, AfterValidator(timezone_aware)]
LocalAuthorityCode = Annotated[str, StringConstraints(max_length=9), AfterValidator(valid_gss_code)]
AgencyCode = Annotated[str, StringConstraints(max_length=40), AfterValidator(valid_agency_code)]
