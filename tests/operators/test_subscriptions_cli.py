"""`tuo subscriptions …` against the running test stack."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest

from runtime.kafka import Topics
from runtime.settings import Settings
from tests.support import death_registration, eventually, read_topic, tuo_cli

pytestmark = pytest.mark.integration


async def test_add_and_list_a_subscription_with_fields_and_an_area(
    services: Settings, pool: asyncpg.Pool
) -> None:
    try:
        code, output = await asyncio.to_thread(
            tuo_cli,
            services,
            "subscriptions",
            "add",
            "council-york",
            "DeathRegistered",
            "--basis",
            "statutory",
            "--statute",
            "Local Government Finance Act 1992 s.11",
            "--field",
            "deceased",
            "--field",
            "last_address",
            "--local-authority",
            "e06000014",
        )
        assert code == 0, output
        code, output = await asyncio.to_thread(tuo_cli, services, "subscriptions", "list")
        [row] = [line for line in output.splitlines() if "council-york" in line]
        assert "deceased, last_address" in row and '"E06000014"' in row and "active" in row
        # read_topic fails if the topic is missing: `add` created the agency's topic
        assert await read_topic(services, Topics(services.topic_prefix).agency("council-york")) == []
    finally:
        # The bus's other tests know only the seed's councils: leave none behind.
        await pool.execute("DELETE FROM subscription WHERE agency = 'council-york'")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--basis", "consent", "--field", "favourite_food"],
            "DeathRegistered has no field path favourite_food",
        ),
        (["--basis", "statutory", "--field", "deceased"], "must cite its statute"),
        (["--basis", "maybe", "--field", "deceased"], "basis"),
        (["--basis", "consent", "--field", "deceased", "--local-authority", "12"], "GSS code"),
        (["--basis", "consent", "--field", "deceased", "--local-authority", "LS"], "GSS code"),
    ],
)
async def test_invalid_subscriptions_are_refused_with_the_reason(
    services: Settings, args: list[str], message: str
) -> None:
    code, output = await asyncio.to_thread(
        tuo_cli, services, "subscriptions", "add", "council-hull", "DeathRegistered", *args
    )
    assert code == 1
    assert message in output.replace("\n", " ")
    _, listing = await asyncio.to_thread(tuo_cli, services, "subscriptions", "list")
    assert "council-hull" not in listing


async def test_suspended_subscription_stops_delivery_from_the_next_decision(
    services: Settings, intake: httpx.AsyncClient
) -> None:
    code, output = await asyncio.to_thread(
        tuo_cli, services, "subscriptions", "suspend", "hmrc", "DeathRegistered"
    )
    assert code == 0 and "Suspended 1" in output
    try:
        accepted = (await intake.post("/v1/death-registrations", json=death_registration())).json()

        async def decided() -> dict[str, str] | None:
            status = (await intake.get(f"/v1/events/{accepted['reference']}")).json()
            return {a["agency"]: a["decision"] for a in status["agencies"]} or None

        decisions = await eventually(decided, what="routing decisions")
        assert decisions["hmrc"] == "withheld_no_subscription"
        assert decisions["dwp"] == "delivered"
    finally:
        code, output = await asyncio.to_thread(tuo_cli, services, "subscriptions", "activate", "hmrc")
        assert code == 0, output


async def test_suspending_an_unknown_agency_is_an_error(services: Settings) -> None:
    code, output = await asyncio.to_thread(tuo_cli, services, "subscriptions", "suspend", "nobody")
    assert code == 1 and "nobody has no subscription" in output
