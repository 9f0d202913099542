"""The informant's confirmations by email, for a request to tell more organisations
(``citizens.informants``), when they gave an address and the service has a mail
server (``smtp_host``):

1. at once, which organisations are being told, and the request's reference;
2. when every organisation chosen has answered (applied or rejected), or is overdue,
   what each did, in the words of the informant's page;

each in the language of the page the informant gave their address on (English or Welsh).

The address is sealed at rest with the data key (``runtime.sealing``) and erased once
the second email is sent; it is never logged. The emails name no one: only the
organisations, what each did, and the reference. A mail server that refuses or cannot
be reached is tried again with a growing delay, and nothing is lost meanwhile: each
email is sent under a row lock and marked sent in the same transaction, so two senders
never send one email twice (a sender killed after the server took an email and before
its commit sends it once more: at least once, never lost).
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import ssl
from dataclasses import dataclass
from datetime import timedelta
from email.message import EmailMessage
from uuid import UUID

import asyncpg
import structlog

from citizens import data_tracker
from router.organisations import agency_name
from router.store import event_status
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from runtime.web.i18n import Language, language
from runtime.web.i18n import gettext as _
from runtime.web.pages import SERVICE_NAME

log = structlog.get_logger(__name__)

# An address as people type it: a local part, an @, a domain with at least one dot. What
# the mail server accepts is the real test; this catches typing mistakes early.
_ADDRESS = re.compile(r"^[^@\s<>()\[\],;:\"]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.)+[A-Za-z]{2,63}$")
MAX_ADDRESS = 254
MAX_DELAY = timedelta(hours=1)


def address_problem(typed: str) -> str | None:
    if len(typed) > MAX_ADDRESS or _ADDRESS.fullmatch(typed) is None:
        return _("Enter an email address in the correct format, like name@example.com")
    return None


async def remember(
    conn: asyncpg.Pool | asyncpg.Connection, sealer: PayloadSealer, request_event_id: UUID, address: str
) -> None:
    """Keep the address for the request's two emails (the first is sent at once), and the
    language of the page the informant gave it on, which the emails are written in."""
    await conn.execute(
        "INSERT INTO informant_email (request_event_id, sealed_address, language) VALUES ($1, $2, $3)"
        " ON CONFLICT (request_event_id) DO NOTHING",
        request_event_id,
        sealer.seal(address.encode(), request_event_id),
        language.get(),
    )


@dataclass(frozen=True)
class Due:
    request_event_id: UUID
    reference: str  # the request's
    address: str
    listed: bool  # the first email has been sent
    attempts: int
    language: Language


def listing(reference: str, agencies: list[str], sender: str, to: str) -> EmailMessage:
    names = sorted(_(agency_name(a)) for a in agencies)
    return _message(
        sender,
        to,
        _("We are telling the organisations you chose – %(reference)s") % {"reference": reference},
        [
            _("You asked Tell Us Once to tell these organisations:"),
            "",
            *(f"- {name}" for name in names),
            "",
            _("Your agreement to each has been recorded, with a consent receipt."),
            _("We will email you again when each one has answered."),
            "",
            _("Your request reference: %(reference)s") % {"reference": reference},
        ],
    )


def answered(reference: str, deliveries: list[data_tracker.Delivery], sender: str, to: str) -> EmailMessage:
    return _message(
        sender,
        to,
        _("Every organisation has answered – %(reference)s") % {"reference": reference},
        [
            _("The organisations you asked Tell Us Once to tell have answered:"),
            "",
            *(f"- {_(d.agency_name)}: {d.receipt_words}" for d in deliveries),
            "",
            _("To see this again, use the reference from the registrar's letter in Tell Us Once online."),
            "",
            _("Your request reference: %(reference)s") % {"reference": reference},
        ],
    )


def _message(sender: str, to: str, subject: str, lines: list[str]) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = f"{_(SERVICE_NAME)}: {subject}"
    message.set_content("\n".join(lines) + "\n")
    return message


def send(settings: Settings, message: EmailMessage) -> None:
    """Hand one email to the mail server (blocking: run it in a thread)."""
    assert settings.smtp_host is not None
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=30) as smtp:
        if settings.smtp_starttls:
            smtp.starttls(context=ssl.create_default_context())
        if settings.smtp_username and settings.smtp_password:
            smtp.login(settings.smtp_username, settings.smtp_password.get_secret_value())
        smtp.send_message(message)


async def chosen_agencies(conn: asyncpg.Connection, request_event_id: UUID) -> list[str]:
    """The organisations the informant chose: those their consent was recorded for."""
    rows = await conn.fetch(
        "SELECT agency FROM consent_receipt WHERE event_id = $1 ORDER BY agency", request_event_id
    )
    return [r["agency"] for r in rows]


async def answers(
    pool: asyncpg.Pool, reference: str, chosen: list[str]
) -> list[data_tracker.Delivery] | None:
    """What each chosen organisation did, once every one has answered or is overdue
    (one the router did not send the request to counts as answered: it was not told)."""
    status = await event_status(pool, reference)
    rows = {row["agency"]: row for row in (status or {}).get("agencies", [])}
    if any(agency not in rows for agency in chosen):
        return None  # not routed yet
    deliveries = [data_tracker.delivery(rows[agency]) for agency in chosen]
    final = [d for d in deliveries if not d.told or d.overdue or d.receipt in ("applied", "rejected")]
    return deliveries if len(final) == len(deliveries) else None


async def send_due(settings: Settings, pool: asyncpg.Pool, sealer: PayloadSealer) -> int:
    """Send the emails due now; returns how many were sent."""
    sent = 0
    async with pool.acquire() as conn:
        while True:
            async with conn.transaction():
                row = await conn.fetchrow(
                    "SELECT e.request_event_id, e.sealed_address, e.listed_at IS NOT NULL AS listed,"
                    "       e.attempts, e.language, i.reference"
                    "  FROM informant_email e JOIN intake_record i ON i.event_id = e.request_event_id"
                    " WHERE e.answered_at IS NULL AND e.next_attempt_at <= now()"
                    " ORDER BY e.next_attempt_at LIMIT 1 FOR UPDATE OF e SKIP LOCKED"
                )
                if row is None:
                    return sent
                due = Due(
                    row["request_event_id"],
                    row["reference"],
                    sealer.open(bytes(row["sealed_address"]), row["request_event_id"]).decode(),
                    row["listed"],
                    row["attempts"],
                    row["language"],
                )
                written_in = language.set(due.language)  # the emails' words, and the data tracker's
                try:
                    sent += await _send_one(settings, pool, conn, due)
                finally:
                    language.reset(written_in)


async def _send_one(settings: Settings, pool: asyncpg.Pool, conn: asyncpg.Connection, due: Due) -> int:
    chosen = await chosen_agencies(conn, due.request_event_id)
    message: EmailMessage | None = None
    if not due.listed:
        message = listing(due.reference, chosen, settings.smtp_sender, due.address)
    elif (final := await answers(pool, due.reference, chosen)) is not None:
        message = answered(due.reference, final, settings.smtp_sender, due.address)
    if message is None:  # listed, and still waiting for answers: look again later
        await conn.execute(
            "UPDATE informant_email SET next_attempt_at = now() + make_interval(secs => $2)"
            " WHERE request_event_id = $1",
            due.request_event_id,
            settings.informant_email_check_seconds,
        )
        return 0
    try:
        await asyncio.to_thread(send, settings, message)
    except (OSError, smtplib.SMTPException) as exc:
        delay = min(timedelta(seconds=5 * 2 ** min(due.attempts, 20)), MAX_DELAY)  # 20: no overflow
        await conn.execute(
            "UPDATE informant_email SET attempts = attempts + 1, last_error = $2,"
            "       next_attempt_at = now() + $3 WHERE request_event_id = $1",
            due.request_event_id,
            type(exc).__name__,  # not its text: a server may echo the address back
            delay,
        )
        log.warning(
            "informant_email_not_sent",
            request_id=str(due.request_event_id),
            error=type(exc).__name__,
            retry_in_seconds=delay.total_seconds(),
        )
        return 0
    if not due.listed:
        await conn.execute(
            "UPDATE informant_email SET listed_at = now(), attempts = 0, last_error = NULL,"
            "       next_attempt_at = now() WHERE request_event_id = $1",
            due.request_event_id,
        )
    else:  # the last email: the address is no longer needed
        await conn.execute(
            "UPDATE informant_email SET answered_at = now(), sealed_address = NULL, attempts = 0,"
            "       last_error = NULL WHERE request_event_id = $1",
            due.request_event_id,
        )
    log.info(
        "informant_email_sent",
        request_id=str(due.request_event_id),
        which="answered" if due.listed else "listed",
    )
    return 1


async def run_informant_emails(settings: Settings, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
    """Send the informants' emails as they fall due, until ``stop``."""
    if settings.smtp_host is None:
        log.info("informant_emails_off", reason="no smtp_host: the journey offers no email")
        await stop.wait()
        return
    sealer = PayloadSealer.from_settings(settings)
    while not stop.is_set():
        await send_due(settings, pool, sealer)
        try:
            await asyncio.wait_for(stop.wait(), timeout=settings.informant_email_check_seconds)
        except TimeoutError:
            pass
