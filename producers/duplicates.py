"""Duplicate registrations: what makes two deaths, or two births, the same one.

A registration *claims* what identifies its subject; PostgreSQL lets one current
registration hold each claim (``registration_claim_held`` in migration 0019), so
a second registration of the same death or birth is refused with the reference
of the first, even when both arrive at once. A void releases the claims; a
supervisor may record a registration over an existing one, with a reason.

The same death:
  * with a NINO: the same NINO. The claim is the pseudonymous subject id, which
    is a keyed hash of the NINO (``producers.accept.subject_id_for``).
  * without a NINO the subject id is random (``s-<uuid>``), new for every
    registration, so it cannot say who died. Then it is the same death when the
    deceased's given names and family name, date of birth (or its absence),
    date of death and last address's postcode are all the same. Names compare
    without regard to case, Unicode form or runs of spaces. A death recorded
    with a NINO and again without one is not detected by this rule.

The same birth: the same child's given names, family name and date of birth,
and a parent in common (a parent's given names and family name; their NINO and
date of birth are often not given, and a parent's NINO does not identify the
child). Twins have different names and are not duplicates of each other.

Claims other than the subject id are keyed hashes (HMAC-SHA-256 under the
pseudonym key): no name or date is stored in clear. Rotating the pseudonym key
therefore also forgets which earlier registrations would be duplicates.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import unicodedata

from producers.requests import BirthRegistration, DeathRegistration, Submission

_SPACES = re.compile(r"\s+")


class DuplicateRegistration(Exception):
    """The same death or birth is already registered (and not voided)."""

    def __init__(self, event_type: str, existing_reference: str, existing_office: str) -> None:
        super().__init__(f"{event_type} already registered as {existing_reference}")
        self.event_type = event_type
        self.existing_reference = existing_reference
        self.existing_office = existing_office

    @property
    def what(self) -> str:
        return {"DeathRegistered": "death", "BirthRegistered": "birth"}.get(self.event_type, "event")


class NothingToOverride(Exception):
    """A supervisor's override names a registration this one does not duplicate."""

    def __init__(self, duplicated: list[str]) -> None:
        super().__init__("the override names no registration this one duplicates")
        self.duplicated = duplicated  # the references it does duplicate (perhaps none)


def _name(value: str) -> str:
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", value)).strip().casefold()


def _keyed(kind: str, parts: list[str | None], key: bytes) -> str:
    message = json.dumps([kind, *parts], ensure_ascii=False, separators=(",", ":")).encode()
    return f"{kind}:" + hmac.new(key, message, hashlib.sha256).hexdigest()[:40]


def registration_claims(submission: Submission, subject_id: str, key: bytes) -> list[str]:
    """What this registration claims; none for an event that may happen more than once."""
    claims: set[str] = set()
    if isinstance(submission, DeathRegistration):
        deceased = submission.deceased
        if deceased.nino is not None:
            claims.add(f"death:{subject_id}")
        else:
            born = deceased.date_of_birth.isoformat() if deceased.date_of_birth else None
            parts = [
                _name(deceased.given_names),
                _name(deceased.family_name),
                born,
                submission.date_of_death.isoformat(),
                submission.last_address.postcode,
            ]
            claims.add(_keyed("death-unidentified", parts, key))
    elif isinstance(submission, BirthRegistration):
        child = submission.child
        assert child.date_of_birth is not None  # required for a birth (BirthRegistration)
        for parent in submission.parents:
            parts = [
                _name(child.given_names),
                _name(child.family_name),
                child.date_of_birth.isoformat(),
                _name(parent.given_names),
                _name(parent.family_name),
            ]
            claims.add(_keyed("birth", parts, key))
    return sorted(claims)  # two parents of the same name make one claim
