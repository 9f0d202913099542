"""Every look at personal data by staff is recorded and shown to the person (issue 25):
an operator reads a dead letter of a citizen's event with `tuo dlq show --reason`, another
office's registrar tries to open the event, and the citizen's page shows both, with why;
the looks are hash-chained, and `tuo audit verify` holds and finds them tampered with."""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from citizens.pages import install_citizen_pages
from devstack.dev_idp import TEST_IDENTITIES
from router import looks
from runtime.pseudonyms import subject_id_for
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from tests.citizen_browser import Stack, browser, serve_citizens, sign_in
from tests.operators.test_dlq import _letter_for, _record, _unregistered_key
from tests.router.test_audit import _copy_of_the_chain
from tests.support import tuo_cli

pytestmark = pytest.mark.integration

_, CHRIS, _ = TEST_IDENTITIES


@pytest.fixture(scope="module")
async def stack(services: Settings, pool: asyncpg.Pool) -> AsyncIterator[Stack]:
    async with serve_citizens(services, pool, install_citizen_pages) as (base_url, idp, settings):
        yield Stack(base_url, idp, settings)


def _text(page: str) -> str:
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


def test_a_look_needs_a_reason_in_plain_words() -> None:
    for reason in ("", "  ", "ok", "x" * 501, "line one\nline two"):
        with pytest.raises(looks.LookRefused):
            looks.check_reason(reason)
    assert looks.check_reason("  checking a stuck event  ") == "checking a stuck event"


async def test_an_operators_and_another_offices_looks_are_shown_to_the_person_and_chained(
    services: Settings, pool: asyncpg.Pool, stack: Stack, intake: httpx.AsyncClient
) -> None:
    chris = subject_id_for(CHRIS.nino, stack.settings.require_pseudonym_key())
    key = await _unregistered_key(pool, PayloadSealer.from_settings(services))
    event_id = await _record(services, pool, key, subject_id=chris, nino=CHRIS.nino)
    letter = await _letter_for(services, pool, event_id, "bus")
    before = len(await looks.looks_at(pool, chris))

    # No reason, no look: nothing is shown and nothing recorded.
    code, out = await asyncio.to_thread(tuo_cli, services, "dlq", "show", str(letter.id))
    assert code != 0 and "--reason" in out, out
    code, out = await asyncio.to_thread(tuo_cli, services, "dlq", "show", str(letter.id), "--reason", "  ")
    assert code == 1 and "say why you look" in out, out
    assert len(await looks.looks_at(pool, chris)) == before
    why = "the office's signing key is unknown; checking before a redrive"
    code, out = await asyncio.to_thread(
        tuo_cli, services, "dlq", "show", str(letter.id), "--reason", why, "--by", "sam.operator"
    )
    assert code == 0 and "not in the key registry" in out, out

    # A registrar of another office asks for the event: refused as if it did not exist, and recorded.
    reference = await pool.fetchval("SELECT reference FROM intake_record WHERE event_id = $1::uuid", event_id)
    assert (await intake.get(f"/v1/events/{reference}")).status_code == 404

    [other_office, operator] = (await looks.looks_at(pool, chris))[:2]
    assert (operator.who, operator.role, operator.reason, operator.refused) == (
        "sam.operator",
        "operator",
        why,
        False,
    )
    assert operator.action == looks.Action.DEAD_LETTER and [str(e) for e in operator.event_ids] == [event_id]
    assert (other_office.role, other_office.refused, other_office.action) == (
        "registrar",
        True,
        looks.Action.OTHER_OFFICE,
    )

    async with browser() as client:
        assert (await sign_in(client, stack, CHRIS.sub)).status_code == 303
        page = await client.get(f"{stack.base_url}/citizen/received")
    assert page.status_code == 200
    text = _text(page.text)
    shown = text[text.index("Who looked at your records") :]
    assert "A Tell Us Once operator" in shown and looks.Action.DEAD_LETTER.value in shown and why in shown
    assert "A registrar at another register office" in shown and looks.Action.OTHER_OFFICE.value in shown
    assert "sam.operator" not in page.text, "a role, never a member of staff's name"

    code, out = await asyncio.to_thread(tuo_cli, services, "audit", "verify")
    assert code == 0 and "looks at personal data; the chain is intact" in out, out
    copy = await _copy_of_the_chain(pool, "looks_")  # tamper with a copy, not the suite's real chain
    try:
        await pool.execute(
            f"UPDATE {copy}.data_look SET reason = 'nothing to see' WHERE seq = $1", operator.seq
        )
        code, out = await asyncio.to_thread(tuo_cli, services, "audit", "verify", "--schema", copy)
        assert code == 1 and f"looks at personal data: row {operator.seq} altered" in out.replace(
            "\n", " "
        ), out
        assert "routing decisions; the chain is intact" in out, out
    finally:
        await pool.execute(f"DROP SCHEMA {copy} CASCADE")
