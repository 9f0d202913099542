"""Proxies: people appointed to act for a citizen on the consent pages.

An appointment (table ``proxy_appointment``) names the proxy and the person they
act for by pseudonymous subject ids, says which agencies it covers (all, or a
list) and from when until when, and who recorded it and why. Operators record
appointments with ``appoint_proxy``; a signed-in proxy who chooses to act for
someone gets an ``ActingFor`` from ``acting_for``, which refuses an appointment
that is someone else's, not yet valid, expired or ended.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from runtime.pseudonyms import subject_id_for
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from schemas.validation import normalise_nino

_SUBJECT_ID = re.compile(r"[ns]-[0-9a-f]{32}")
_AGENCY = re.compile(r"[a-z][a-z0-9-]{1,39}")


class InvalidAppointment(ValueError):
    """An appointment cannot be recorded as asked; the message says what to change."""


class NotAppointed(Exception):
    """The signed-in person holds no appointment with this id that is valid now."""

    def __init__(self, appointment_id: str) -> None:
        super().__init__(f"no current appointment {appointment_id!r} for this person")
        self.appointment_id = appointment_id


@dataclass(frozen=True)
class Appointment:
    id: uuid.UUID
    proxy_subject_id: str
    subject_id: str
    subject_name: str
    agencies: frozenset[str] | None  # None: every agency
    valid_from: datetime
    valid_to: datetime | None
    recorded_by: str
    reason: str

    def covers(self, agency: str) -> bool:
        return self.agencies is None or agency in self.agencies


async def appoint_proxy(
    pool: asyncpg.Pool,
    settings: Settings,
    *,
    proxy_subject_id: str,
    subject_id: str,
    subject_name: str,
    agencies: Iterable[str] | None,
    recorded_by: str,
    reason: str,
    valid_from: datetime | None = None,
    valid_to: datetime | None = None,
) -> uuid.UUID:
    """Record that ``proxy_subject_id`` may act for ``subject_id`` (for ``agencies``,
    or every agency when None); return the appointment's id."""
    for what, value in (("proxy", proxy_subject_id), ("subject", subject_id)):
        if not _SUBJECT_ID.fullmatch(value):
            raise InvalidAppointment(
                f"the {what} must be a pseudonymous subject id (n-… with 32 hex digits, "
                "see producers.accept.subject_id_for), never a NINO or a name"
            )
    if proxy_subject_id == subject_id:
        raise InvalidAppointment("a person cannot be their own proxy")
    covered = None if agencies is None else sorted(set(agencies))
    if covered is not None:
        if not covered:
            raise InvalidAppointment("name at least one agency, or none at all for every agency")
        wrong = [agency for agency in covered if not _AGENCY.fullmatch(agency)]
        if wrong:
            raise InvalidAppointment(f"not agency codes (lower case, like 'hmrc'): {', '.join(wrong)}")
    if not recorded_by.strip() or not reason.strip():
        raise InvalidAppointment("say who records the appointment and why (the legal authority)")
    if not subject_name.strip():
        raise InvalidAppointment("give the name the proxy knows the person by")
    if valid_from is not None and valid_to is not None and valid_to <= valid_from:
        raise InvalidAppointment("the appointment must end after it starts")
    appointment_id = uuid.uuid4()
    sealed_name = PayloadSealer.from_settings(settings).seal(subject_name.strip().encode(), appointment_id)
    await pool.execute(
        "INSERT INTO proxy_appointment (id, proxy_subject_id, subject_id, subject_name, agencies,"
        "  valid_from, valid_to, recorded_by, reason)"
        " VALUES ($1, $2, $3, $4, $5, coalesce($6, now()), $7, $8, $9)",
        appointment_id,
        proxy_subject_id,
        subject_id,
        sealed_name,
        covered,
        valid_from,
        valid_to,
        recorded_by.strip(),
        reason.strip(),
    )
    return appointment_id


async def appoint_proxy_by_nino(
    pool: asyncpg.Pool,
    settings: Settings,
    *,
    proxy_nino: str,
    subject_nino: str,
    subject_name: str,
    agencies: Iterable[str] | None,
    recorded_by: str,
    reason: str,
    valid_to: datetime | None = None,
) -> uuid.UUID:
    """``appoint_proxy`` for operators, who know both people by National Insurance number:
    each NINO is used only to derive the pseudonymous subject id, never stored."""
    key = settings.require_pseudonym_key()
    try:
        proxy, subject = normalise_nino(proxy_nino), normalise_nino(subject_nino)
    except ValueError as bad:
        raise InvalidAppointment(f"not a National Insurance number: {bad}") from None
    return await appoint_proxy(
        pool,
        settings,
        proxy_subject_id=subject_id_for(proxy, key),
        subject_id=subject_id_for(subject, key),
        subject_name=subject_name,
        agencies=agencies,
        recorded_by=recorded_by,
        reason=reason,
        valid_to=valid_to,
    )


async def end_appointment(pool: asyncpg.Pool, appointment_id: uuid.UUID) -> bool:
    """End an appointment now; False when there was no such appointment still running."""
    result: str = await pool.execute(
        "UPDATE proxy_appointment SET ended_at = clock_timestamp() WHERE id = $1 AND ended_at IS NULL",
        appointment_id,
    )
    return result.endswith(" 1")


_CURRENT = (
    "SELECT id, proxy_subject_id, subject_id, subject_name, agencies, valid_from, valid_to,"
    "       recorded_by, reason"
    "  FROM proxy_appointment"
    " WHERE proxy_subject_id = $1 AND ended_at IS NULL"
    "   AND valid_from <= now() AND (valid_to IS NULL OR valid_to > now())"
)


def _appointment(row: asyncpg.Record, sealer: PayloadSealer) -> Appointment:
    return Appointment(
        id=row["id"],
        proxy_subject_id=row["proxy_subject_id"],
        subject_id=row["subject_id"],
        subject_name=sealer.open(bytes(row["subject_name"]), row["id"]).decode(),
        agencies=None if row["agencies"] is None else frozenset(row["agencies"]),
        valid_from=row["valid_from"],
        valid_to=row["valid_to"],
        recorded_by=row["recorded_by"],
        reason=row["reason"],
    )


async def appointments_of(pool: asyncpg.Pool, settings: Settings, proxy_subject_id: str) -> list[Appointment]:
    """The appointments this person holds that are valid now."""
    rows = await pool.fetch(_CURRENT + " ORDER BY recorded_at", proxy_subject_id)
    sealer = PayloadSealer.from_settings(settings)
    return [_appointment(row, sealer) for row in rows]


async def acting_for(
    pool: asyncpg.Pool, settings: Settings, proxy_subject_id: str, appointment_id: str
) -> Appointment:
    """The appointment ``proxy_subject_id`` holds under this id, valid now; else ``NotAppointed``."""
    try:
        wanted = uuid.UUID(appointment_id)
    except ValueError:
        raise NotAppointed(appointment_id[:40]) from None
    row = await pool.fetchrow(_CURRENT + " AND id = $2", proxy_subject_id, wanted)
    if row is None:
        raise NotAppointed(str(wanted))
    return _appointment(row, PayloadSealer.from_settings(settings))
