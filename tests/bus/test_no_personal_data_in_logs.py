"""The logs of a whole flow hold none of the personal data that flowed through it.

A death is registered at intake for a person with records at every agency; the
router routes it, each entitled agency applies it and receipts it, and the receipt
tracker stores the receipts. Every line logged meanwhile, through structlog (as the
JSON renderer writes it) and through the standard library (aiokafka, asyncpg,
uvicorn), and anything else written to stdout or stderr, is searched for the
person's names, NINO, postcode, street and date of birth, in any spacing or case.

Every component's lines must be among them, so that the test fails if logging
stopped. The receipt tracker logs nothing per receipt, so a second router, set of
agency consumers and tracker join their groups while the log is captured (their
start-up lines are logged then); the event is handled by whichever instance owns
its partitions. Every Kafka password and the database password are searched for too.
"""

from __future__ import annotations

import json
import logging
import random
import re
import string
import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from operators.services import start_bus
from runtime.access import credentials_file
from runtime.logging import configured_logging
from runtime.settings import Settings
from schemas import models
from tests.support import death_registration, eventually, known_to_every_agency, random_nino, today

pytestmark = pytest.mark.integration

ENTITLED = ("council-leeds", "dvla", "dwp", "hmrc")  # dvla by the informant's consent


def _anywhere(text: str) -> re.Pattern[str]:
    """``text`` in any case, with or without spaces between its characters."""
    compact = text.replace(" ", "")
    return re.compile(r"\s*".join(map(re.escape, compact)), re.IGNORECASE)


def _lines_by_event(log: str) -> dict[str, list[dict[str, Any]]]:
    by_event: dict[str, list[dict[str, Any]]] = {}
    for line in log.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            by_event.setdefault(entry["event"], []).append(entry)
    return by_event


def _kafka_passwords(settings: Settings) -> dict[str, str]:
    store = credentials_file(settings)
    return store.read() if store is not None else {}


def _database_password(settings: Settings) -> str:
    return urlsplit(settings.require_database_url()).password or ""


async def _final_receipts(pool: asyncpg.Pool, event_id: str) -> dict[str, str]:
    rows = await pool.fetch(
        "SELECT agency, outcome FROM delivery_receipt"
        " WHERE event_id = $1 AND outcome IN ('APPLIED', 'REJECTED')",
        uuid.UUID(event_id),
    )
    return {r["agency"]: r["outcome"] for r in rows}


async def test_the_logs_of_a_death_from_intake_to_every_agencys_receipt_hold_no_name_nino_postcode_or_dob(
    services: Settings,
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    suffix = "".join(random.choices(string.ascii_lowercase, k=8))
    given_names, family_name = "Philippa Ottoline", "Quarrendon" + suffix
    informant_name, partner_name = "Barnaby Quarrendon" + suffix, "Lavinia"
    nino, born = random_nino(), date(1938, 11, 23)
    street = f"{random.randint(100, 999)} Wintersgill Row"
    home = models.Address(lines=[street], town="Leeds", postcode="LS7 3QX")
    person = models.Person(given_names=given_names, family_name=family_name, date_of_birth=born)
    partner = models.Person(given_names=partner_name, family_name=family_name, date_of_birth=date(1940, 6, 7))
    await known_to_every_agency(pool, nino, person, partner, home)
    body = death_registration(
        informant={"name": informant_name, "relationship": "son"},
        deceased={
            "given_names": given_names,
            "family_name": family_name,
            "date_of_birth": born.isoformat(),
            "nino": nino,
        },
        date_of_death=(today() - timedelta(days=3)).isoformat(),
        last_address={"lines": [street], "town": "Leeds", "postcode": home.postcode},
    )
    log_file = tmp_path / "flow.log"
    capfd.readouterr()  # what earlier tests left behind is not this flow's
    with configured_logging(
        services.model_copy(update={"log_level": "DEBUG", "log_format": "json"}), log_file
    ):
        logging.getLogger().setLevel(logging.INFO)  # the libraries' INFO lines are searched too
        joined = await start_bus(services, pool, components=("router", "agencies", "tracker"))
        try:
            response = await intake.post("/v1/death-registrations", json=body)
            assert response.status_code == 201, response.text
            event_id = response.json()["event_id"]

            async def all_final() -> dict[str, str] | None:
                found = await _final_receipts(pool, event_id)
                return found if set(ENTITLED) <= set(found) else None

            receipts = await eventually(
                all_final, timeout=90, what="a final receipt from every entitled agency"
            )
            assert {a: receipts[a] for a in ENTITLED} == dict.fromkeys(ENTITLED, "APPLIED")
        finally:
            await joined.shutdown()
    captured = capfd.readouterr()
    log = log_file.read_text()
    everything = "\n".join((log, captured.out, captured.err))

    # The capture is this flow's, from every component: if logging stopped, this fails.
    by_event = _lines_by_event(log)
    assert [e for e in by_event.get("event_accepted", []) if e["event_id"] == event_id], (
        "intake logged nothing"
    )
    assert [e for e in by_event.get("event_routed", []) if e["event_id"] == event_id], (
        "the router logged nothing"
    )
    handled = {e["agency"] for e in by_event.get("event_handled", []) if e["event_id"] == event_id}
    assert set(ENTITLED) <= handled, f"agency consumers logged {sorted(handled)}"
    assert by_event.get("router_started", []), "the router logged nothing"
    assert by_event.get("agency_consumer_started", []), "the agency consumers logged nothing"
    assert by_event.get("receipt_tracker_started", []), "the receipt tracker logged nothing"
    assert re.search(r"^INFO:aiokafka", log, re.MULTILINE), "no standard-library line was captured"

    personal = {
        "given names": given_names,
        **{f"given name {n}": n for n in given_names.split()},
        "family name": family_name,
        "informant's name": informant_name,
        "partner's given name": partner_name,
        "street": street,
        "NINO": nino,
        "postcode": home.postcode,
        "date of birth (ISO)": born.isoformat(),
        "date of birth (DD/MM/YYYY)": born.strftime("%d/%m/%Y"),
    }
    leaks = {
        what: m.group() for what, value in personal.items() if (m := _anywhere(value).search(everything))
    }
    assert not leaks, f"personal data in the logs: {leaks}"
