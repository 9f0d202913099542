"""The Prometheus endpoint each process of the bus serves (``TUO_METRICS_PORT``),
scraped over HTTP with a monitoring token, against the real broker and database.

A process has one registry, whichever buses it starts: here the session's bus
(intake, relay, router, agencies, tracker) and a second one started by this
module with the metrics port and the consumers of two test agencies, which are
subscribed to deaths in one postcode district only, so only this module's deaths
reach them. Counters are compared before and after, once the bus is quiet.
"""

from __future__ import annotations

import asyncio
import random
import string
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from operators.services import RunningBus, start_bus
from producers.accounts import issue_token
from router.store import upsert_subscription
from runtime.access import onboard_agency
from runtime.kafka import Topics
from runtime.settings import Settings
from tests.support import death_registration, eventually, inspector_producer, random_nino

pytestmark = pytest.mark.integration

DISTRICT = "KW15"  # no other test registers deaths here
TOLD = "t-metrics"  # statutory: told of every death in the district
ASKED = "t-metrics-consent"  # on consent, which nobody gives it: always withheld
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
async def monitoring_token(pool: asyncpg.Pool) -> str:
    return await issue_token(pool, "leeds", "monitoring", "metrics test monitoring")


@pytest.fixture(scope="module")
async def metrics_bus(services: Settings, pool: asyncpg.Pool, bus: RunningBus) -> AsyncIterator[RunningBus]:
    """A second bus in this process, serving the metrics on a free port and running the
    agency consumers (the test agencies' among them: the session's bus predates them)."""
    for agency, basis in ((TOLD, "statutory"), (ASKED, "consent")):
        await upsert_subscription(
            pool,
            agency=agency,
            event_type="DeathRegistered",
            legal_basis=basis,
            statute="Test Metrics Act 2026 s.1" if basis == "statutory" else None,
            fields=["deceased", "date_of_death", "last_address"],
            condition={"postcode_areas": [DISTRICT]},
        )
    await onboard_agency(services, pool, TOLD, [], by="tests", reinstate=True)
    running = await start_bus(services.model_copy(update={"metrics_port": 0}), pool, components=("agencies",))
    yield running
    await running.shutdown()


async def _scrape(port: int, token: str) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(
            f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {token}"}
        )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return response.text


def _samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _lag(samples: Samples) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["group"], dict(labels)["topic"]): value
        for (name, labels), value in samples.items()
        if name == "tuo_consumer_lag"
    }


async def _quiet(port: int, token: str) -> Samples:
    """The counters once nothing is moving: every consumer caught up, and two scrapes a
    second apart the same (what earlier tests sent has been handled)."""

    async def settled() -> Samples | None:
        before = _samples(await _scrape(port, token))
        await asyncio.sleep(1)
        after = _samples(await _scrape(port, token))
        if before != after or any(_lag(after).values()):
            return None
        return after

    return await eventually(settled, timeout=60, what="the bus to be quiet")


async def _register_deaths(intake: httpx.AsyncClient, count: int) -> tuple[list[str], dict[str, str]]:
    suffix = "".join(random.choices(string.ascii_lowercase, k=8))
    personal = {"family name": "Metricson" + suffix, "postcode": f"{DISTRICT} 1AA"}
    event_ids = []
    for n in range(count):
        nino = random_nino()
        personal[f"NINO {n}"] = nino
        body = death_registration(
            deceased={
                "given_names": "Morag",
                "family_name": personal["family name"],
                "date_of_birth": "1937-05-06",
                "nino": nino,
            },
            last_address={"lines": ["3 Harbour Road"], "town": "Kirkwall", "postcode": personal["postcode"]},
        )
        response = await intake.post("/v1/death-registrations", json=body)
        assert response.status_code == 201, response.text
        event_ids.append(response.json()["event_id"])
    return event_ids, personal


async def _decisions(pool: asyncpg.Pool, event_ids: list[str]) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT agency, outcome FROM routing_decision WHERE event_id = ANY($1::uuid[])",
        [uuid.UUID(e) for e in event_ids],
    )
    return rows


async def _final_receipts(pool: asyncpg.Pool, event_ids: list[str]) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT agency, outcome FROM delivery_receipt"
        " WHERE event_id = ANY($1::uuid[]) AND outcome IN ('APPLIED', 'REJECTED')",
        [uuid.UUID(e) for e in event_ids],
    )
    return rows


async def test_the_metrics_endpoint_counts_exactly_the_deaths_sent_from_intake_to_every_receipt(
    services: Settings,
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    metrics_bus: RunningBus,
    monitoring_token: str,
) -> None:
    assert metrics_bus.metrics_port
    port = metrics_bus.metrics_port
    before = await _quiet(port, monitoring_token)

    sent = 3
    event_ids, personal = await _register_deaths(intake, sent)

    async def every_receipt_stored() -> bool:
        decisions = await _decisions(pool, event_ids)
        delivered = sum(1 for d in decisions if d["outcome"] == "DELIVERED")
        return bool(decisions) and len(await _final_receipts(pool, event_ids)) == delivered

    await eventually(every_receipt_stored, timeout=90, what="a final receipt for every delivery")
    after = await _quiet(port, monitoring_token)

    def moved(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert moved("tuo_events_accepted_total", event_type="DeathRegistered") == sent
    assert moved("tuo_events_published_total") == sent
    assert moved("tuo_events_routed_total", event_type="DeathRegistered") == sent

    # Every routing decision the router recorded for these deaths is counted once.
    decisions = Counter((d["agency"], d["outcome"]) for d in await _decisions(pool, event_ids))
    assert decisions[(TOLD, "DELIVERED")] == sent
    assert decisions[(ASKED, "WITHHELD_NO_CONSENT")] == sent
    assert decisions[("hmpo", "WITHHELD_NO_CONSENT")] == sent, "the informant refused hmpo"
    assert decisions[("council-leeds", "WITHHELD_NO_SUBSCRIPTION")] == sent, "outside its area"
    reasons = {
        "WITHHELD_NO_CONSENT": "no_consent",
        "WITHHELD_NO_SUBSCRIPTION": "no_subscription",
        "BLOCKED": "blocked",
    }
    for (agency, outcome), n in decisions.items():
        if outcome == "DELIVERED":
            assert moved("tuo_deliveries_total", agency=agency) == n, agency
        else:
            assert moved("tuo_withheld_total", agency=agency, reason=reasons[outcome]) == n, (agency, outcome)

    # Every final receipt stored, by outcome, and one latency observation per delivery.
    receipts = Counter((r["agency"], r["outcome"]) for r in await _final_receipts(pool, event_ids))
    assert receipts[(TOLD, "APPLIED")] == sent
    for (agency, outcome), n in receipts.items():
        assert moved("tuo_receipts_stored_total", agency=agency, outcome=outcome.lower()) == n, (
            agency,
            outcome,
        )
    for agency in {a for a, outcome in decisions if outcome == "DELIVERED"}:
        assert moved("tuo_receipt_latency_seconds_count", agency=agency) == sent, agency
    assert moved("tuo_receipts_sent_total", agency=TOLD, outcome="applied") == sent
    assert 0 <= moved("tuo_receipt_latency_seconds_sum", agency=TOLD) < 60 * sent

    # Each consumer's lag is there, and back at 0 now that everything is handled.
    lag, prefix = _lag(after), services.topic_prefix
    assert lag[(f"{prefix}.agency.{TOLD}", Topics(prefix).agency(TOLD))] == 0
    assert {group for group, _ in lag} >= {f"{prefix}.router", f"{prefix}.receipt-tracker"}
    assert not any(lag.values())

    text = await _scrape(port, monitoring_token)
    leaks = [what for what, value in personal.items() if value.lower() in text.lower()]
    assert not leaks, f"personal data in the metrics: {leaks}"
    assert not [e for e in event_ids if e in text], "event ids are not labels"


async def test_a_message_the_router_cannot_route_is_counted_as_its_dead_letter(
    services: Settings, metrics_bus: RunningBus, monitoring_token: str
) -> None:
    assert metrics_bus.metrics_port
    port = metrics_bus.metrics_port
    before = _value(await _quiet(port, monitoring_token), "tuo_dead_letters_total", component="router")
    producer = inspector_producer(services)
    await producer.start()
    try:
        await producer.send_and_wait(Topics(services.topic_prefix).life_events, b"not a life event", key=b"x")
    finally:
        await producer.stop()

    async def counted() -> float | None:
        now = _value(
            _samples(await _scrape(port, monitoring_token)), "tuo_dead_letters_total", component="router"
        )
        return now if now > before else None

    assert await eventually(counted, timeout=30, what="the dead letter counted") == before + 1


@pytest.mark.parametrize(
    ("authorization", "status"),
    [(None, 401), ("Bearer tuo_not-a-token", 401), ("Basic bW9uaXRvcjpzZWNyZXQ=", 401), ("registrar", 403)],
)
async def test_the_metrics_endpoint_refuses_anyone_without_a_monitoring_token(
    metrics_bus: RunningBus, registrar_token: str, authorization: str | None, status: int
) -> None:
    headers: dict[str, Any] = {}
    if authorization == "registrar":
        headers["Authorization"] = f"Bearer {registrar_token}"
    elif authorization is not None:
        headers["Authorization"] = authorization
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"http://127.0.0.1:{metrics_bus.metrics_port}/metrics", headers=headers)
    assert response.status_code == status, response.text
    assert "tuo_" not in response.text
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_the_metrics_port_is_a_setting_that_refuses_nonsense() -> None:
    assert Settings(metrics_port=9464).metrics_port == 9464
    assert Settings().metrics_port is None, "off unless asked for"
    for bad in (-1, 65536):
        with pytest.raises(ValueError, match="metrics_port"):
            Settings(metrics_port=bad)
