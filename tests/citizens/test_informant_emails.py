"""The informant's confirmations by email, against a real mail server on 127.0.0.1
(aiosmtpd), the real PostgreSQL and the running bus: the journey records the address
with the request, and the sender (``citizens.emails``, as ``tuo run`` runs it beside the
receipt tracker) sends who is being told, then what each did."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from email import message_from_bytes, policy
from email.message import Message
from typing import Any

import asyncpg
import httpx
import pytest
import structlog
from aiosmtpd.controller import Controller
from fastapi import FastAPI

from citizens.emails import run_informant_emails, send_due
from devstack.processes import free_port
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from tests.citizen_browser import Stack, browser, serve_citizens
from tests.citizens.test_informant_journey import (
    PASSPORT,
    error_links,
    follow_ups,
    install_with_intake,
    opened,
    text_of,
)
from tests.support import eventually

pytestmark = pytest.mark.integration

ADDRESS = "alex.example@example.org"


class Mailbox:
    """What the mail server was given, as aiosmtpd hands it over."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content, policy=policy.default))
        return "250 Message accepted for delivery"


@pytest.fixture(scope="module")
def mailbox() -> Iterator[tuple[Mailbox, Controller]]:
    box = Mailbox()
    server = Controller(box, hostname="127.0.0.1", port=free_port())
    server.start()
    try:
        yield box, server
    finally:
        server.stop()


@pytest.fixture(scope="module")
async def mail_settings(services: Settings, mailbox: tuple[Mailbox, Controller]) -> Settings:
    return services.model_copy(
        update={
            "smtp_host": "127.0.0.1",
            "smtp_port": mailbox[1].port,
            "smtp_starttls": False,  # a server on this machine only
            "informant_email_check_seconds": 0.2,
        }
    )


@pytest.fixture(scope="module")
async def stack(mail_settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Stack]:
    def install(app: FastAPI, settings: Settings, pool: asyncpg.Pool) -> None:
        install_with_intake(app, settings, pool)

    async with serve_citizens(mail_settings, pool, install) as (base_url, idp, settings):
        yield Stack(base_url, idp, settings)


def body_of(message: Message) -> str:
    payload = message.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()


async def requested(client: httpx.AsyncClient, stack: Stack, csrf: str, email: str) -> str:
    answers = {"csrf_token": csrf, "agencies": "hmpo", "passport_number": PASSPORT, "permission": "yes"}
    sent = await client.post(
        f"{stack.base_url}/tell-us-once/services/confirm", data={**answers, "email": email}
    )
    assert sent.status_code == 200, text_of(sent.text)
    assert "We will email you now" in sent.text
    found = re.search(r"TUO-\d{4}-[0-9A-Z]{4}-[0-9A-Z]{4}", text_of(sent.text).split("reference", 1)[1])
    assert found
    return found.group(0)


async def test_the_informant_is_emailed_who_is_told_then_what_each_did_and_the_address_is_then_erased(
    stack: Stack,
    mail_settings: Settings,
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    mailbox: tuple[Mailbox, Controller],
) -> None:
    box = mailbox[0]
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        sender = asyncio.create_task(run_informant_emails(mail_settings, pool, stop))
        try:
            async with browser() as client:
                _, csrf = await opened(client, stack, intake)
                form = await client.get(f"{stack.base_url}/tell-us-once/services")
                assert 'name="email"' in form.text and 'autocomplete="email"' in form.text
                reference = await requested(client, stack, csrf, ADDRESS)

            def mail_about(subject: str) -> Message | None:
                return next(
                    (m for m in box.messages if reference in m["Subject"] and subject in m["Subject"]), None
                )

            async def listing() -> Message | None:
                return mail_about("We are telling the organisations you chose")

            first = await eventually(listing, timeout=30, what="the email saying who is being told")
            assert first["To"] == ADDRESS
            assert "- HM Passport Office" in body_of(first) and "Driver and Vehicle" not in body_of(first)

            async def answered() -> Message | None:
                return mail_about("Every organisation has answered")

            second = await eventually(answered, timeout=60, what="the email saying what each did")
            assert "- HM Passport Office: They confirmed they have updated their records." in body_of(second)
        finally:
            stop.set()
            await sender
    # The emails name no one: no name, no date of birth, no passport number.
    for message in (first, second):
        assert not re.search(r"Example|1941|" + PASSPORT, body_of(message) + message["Subject"])
    assert len([m for m in box.messages if reference in m["Subject"]]) == 2, "each email once"
    row = await pool.fetchrow(
        "SELECT e.sealed_address, e.listed_at, e.answered_at FROM informant_email e"
        " JOIN intake_record i ON i.event_id = e.request_event_id WHERE i.reference = $1",
        reference,
    )
    assert row["sealed_address"] is None and row["listed_at"] and row["answered_at"]
    assert ADDRESS not in repr(logs), "the address is never logged"


async def test_a_mail_server_that_is_down_delays_the_email_and_loses_nothing(
    stack: Stack, mail_settings: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    # The sender's mail server is one that is not there yet: nothing listens on its port.
    port = free_port()
    settings = mail_settings.model_copy(update={"smtp_port": port})
    sealer = PayloadSealer.from_settings(settings)
    async with browser() as client:
        _, csrf = await opened(client, stack, intake)
        reference = await requested(client, stack, csrf, ADDRESS)
    pending = (
        "SELECT e.attempts, e.last_error, e.listed_at, e.sealed_address IS NOT NULL AS kept"
        "  FROM informant_email e JOIN intake_record i ON i.event_id = e.request_event_id"
        " WHERE i.reference = $1"
    )
    assert await send_due(settings, pool, sealer) == 0
    row = await pool.fetchrow(pending, reference)
    assert (row["attempts"], row["last_error"], row["listed_at"], row["kept"]) == (
        1,
        "ConnectionRefusedError",
        None,
        True,
    )
    # The server is back; tried again when due (here at once, not after the backoff): sent, once.
    box = Mailbox()
    server = Controller(box, hostname="127.0.0.1", port=port)
    server.start()
    try:
        await pool.execute(
            "UPDATE informant_email SET next_attempt_at = now()"
            " WHERE request_event_id = (SELECT event_id FROM intake_record WHERE reference = $1)",
            reference,
        )
        assert await send_due(settings, pool, sealer) >= 1
    finally:
        server.stop()
    # The first email once (the second may follow at once, if the Passport Office has answered).
    listed = [m for m in box.messages if reference in m["Subject"] and "We are telling" in m["Subject"]]
    assert [m["To"] for m in listed] == [ADDRESS]
    assert (await pool.fetchrow(pending, reference))["listed_at"] is not None


@pytest.mark.parametrize(
    "email",
    [
        "not an address",
        "a@b",
        "<script>@example.org",
        "x" * 100_000 + "@example.org",
        "a@example.org\r\nBcc: b@x.org",
    ],
)
async def test_a_wrong_or_hostile_email_address_gets_a_linked_error_and_records_nothing(
    stack: Stack, pool: asyncpg.Pool, intake: httpx.AsyncClient, email: str
) -> None:
    async with browser() as client:
        reference, csrf = await opened(client, stack, intake)
        answers = {"csrf_token": csrf, "agencies": "hmpo", "passport_number": PASSPORT, "permission": "yes"}
        for path in ("/tell-us-once/services", "/tell-us-once/services/confirm"):
            refused = await client.post(f"{stack.base_url}{path}", data={**answers, "email": email})
            assert refused.status_code == 400, text_of(refused.text)
            assert error_links(refused.text) == {
                "email": "Enter an email address in the correct format, like name@example.com"
            }
            assert len(refused.text) < 40_000
    assert await follow_ups(pool, reference) == 0


async def test_an_informant_who_used_the_journey_in_welsh_is_emailed_in_welsh(
    stack: Stack,
    mail_settings: Settings,
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    mailbox: tuple[Mailbox, Controller],
) -> None:
    async with browser() as client:
        assert (await client.get(f"{stack.base_url}/tell-us-once?lang=cy")).status_code == 200
        _, csrf = await opened(client, stack, intake)
        answers = {"csrf_token": csrf, "agencies": "hmpo", "passport_number": PASSPORT, "permission": "yes"}
        sent = await client.post(
            f"{stack.base_url}/tell-us-once/services/confirm", data={**answers, "email": ADDRESS}
        )
        assert sent.status_code == 200 and "Byddwn yn anfon e-bost atoch nawr" in sent.text
        found = re.search(
            r"TUO-\d{4}-[0-9A-Z]{4}-[0-9A-Z]{4}", text_of(sent.text).split("Cyfeirnod eich cais", 1)[1]
        )
        assert found
    assert await send_due(mail_settings, pool, PayloadSealer.from_settings(mail_settings)) >= 1
    welsh = next(m for m in mailbox[0].messages if found.group(0) in m["Subject"])
    assert welsh["Subject"].startswith(
        "Dweud Wrthym Unwaith: Rydym yn rhoi gwybod i’r sefydliadau a ddewisoch"
    )
    assert "- Swyddfa Pasbort EF" in body_of(welsh) and f"Cyfeirnod eich cais: {found.group(0)}" in body_of(
        welsh
    )
