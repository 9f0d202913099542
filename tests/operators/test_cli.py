"""The ``tuo`` command line against the running test stack."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from typer.testing import CliRunner

from operators.cli import app
from runtime.settings import Settings
from tests.support import death_registration, eventually, tuo_cli

pytestmark = pytest.mark.integration


async def test_status_prints_each_agencys_decision_and_receipt(
    intake: httpx.AsyncClient, services: Settings
) -> None:
    accepted = (await intake.post("/v1/death-registrations", json=death_registration())).json()

    async def receipts_in() -> bool:
        status = (await intake.get(f"/v1/events/{accepted['reference']}")).json()
        return sum(1 for a in status["agencies"] if a["receipt"]) == 5

    await eventually(receipts_in, what="five receipts")
    code, output = await asyncio.to_thread(
        tuo_cli, services, "status", accepted["reference"].lower(), "--reason", "checking a test event"
    )
    assert code == 0, output
    assert accepted["reference"] in output
    rows = {line.split("│")[1].strip(): line for line in output.splitlines() if line.count("│") > 3}
    for agency in ("hmrc", "dwp", "dvla", "council-leeds", "ons"):
        assert "delivered" in rows[agency] and "applied" in rows[agency], rows.get(agency)
    assert "withheld: no consent" in rows["hmpo"]
    assert "not subscribed" in rows["council-bradford"], "a Leeds address is outside Bradford's area"


@pytest.mark.usefixtures("pool")  # a migrated database, whichever test runs first
async def test_status_of_unknown_reference_fails_with_a_message(services: Settings) -> None:
    code, output = await asyncio.to_thread(
        tuo_cli, services, "status", "TUO-2026-0000-0000", "--reason", "checking a test event"
    )
    assert code == 1
    assert "no event has reference TUO-2026-0000-0000" in output


async def test_stack_status_reports_both_servers_running(services: Settings) -> None:
    code, output = await asyncio.to_thread(tuo_cli, services, "stack", "status")
    assert code == 0
    kafka_line = next(line for line in output.splitlines() if "Kafka" in line)
    postgres_line = next(line for line in output.splitlines() if "PostgreSQL" in line)
    assert "running" in kafka_line and services.kafka_bootstrap_servers in kafka_line
    assert "running" in postgres_line and "***" in postgres_line, "the password is masked"


def test_unknown_component_is_refused_with_the_choices() -> None:
    result = CliRunner().invoke(app, ["run", "teleporter"], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "unknown component teleporter" in result.output
    assert "intake, relay, router, agencies, tracker" in result.output
