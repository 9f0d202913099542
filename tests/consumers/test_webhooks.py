"""Webhook delivery on the real path: the bus's router, Kafka, the webhook bridge, and the
reference receiver served over HTTPS with a local CA, against the session's stack.

A registrar records a death; the bridge POSTs it to the agency's endpoint; the receiver
checks both signatures and applies it once; the agency's RECEIVED receipt reaches the
receipt tracker, and `tuo status` and `tuo webhooks log` show where it got to."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn

from citizens.data_tracker import received
from consumers import DeliveredEvent, KeyRing
from consumers.agency_api import create_client
from consumers.webhook_agency import MAX_BODY, ReceiptClient, create_receiver
from consumers.webhooks import WebhookBridge, set_endpoint
from consumers.webhooks.requests import AVRO, CircuitBreaker, forwarded_headers, http_headers
from devstack.certificates import loopback_server_tls
from router.store import upsert_subscription
from runtime.access import onboard_agency
from runtime.kafka import Topics
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from tests.support import (
    death_message,
    death_registration,
    eventually,
    header,
    office_key,
    random_nino,
    read_topic,
    tuo_cli,
)

pytestmark = pytest.mark.integration

TIMEOUT_SECONDS = 1.0  # the bridge's per-attempt timeout here; a hanging endpoint outlasts it


@dataclass
class Faults:
    """What the endpoint does instead of answering: 'ok', '500' or 'hang'; and the
    requests it was sent, by webhook-id."""

    mode: str = "ok"
    requests: Counter[str] = field(default_factory=Counter)


class Applied:
    """The agency's handler: counts each event it applies (it must see each once)."""

    def __init__(self) -> None:
        self.times: Counter[str] = Counter()

    async def __call__(self, event: DeliveredEvent, conn: asyncpg.Connection) -> None:
        self.times[event.event_id] += 1


def _faulty(app: Any, faults: Faults) -> Any:
    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            faults.requests[dict(scope["headers"]).get(b"webhook-id", b"").decode()] += 1
        if scope["type"] == "http" and faults.mode == "500":
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b"down for maintenance"})
            return
        if scope["type"] == "http" and faults.mode == "hang":
            await asyncio.sleep(TIMEOUT_SECONDS * 3)
        await app(scope, receive, send)

    return asgi


@dataclass
class Agency:
    name: str
    url: str
    secret: str
    applied: Applied
    faults: Faults
    settings: Settings  # the bus's, with the local CA trusted for webhooks


class _Server(uvicorn.Server):
    """uvicorn that leaves the test process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def _https(app: Any, cert: Path, key: Path) -> AsyncIterator[int]:
    server = _Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            ssl_certfile=str(cert),
            ssl_keyfile=str(key),
            log_level="warning",
            lifespan="off",
        )
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        assert not serving.done(), "the receiver did not start"
        await asyncio.sleep(0.02)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await serving


@contextlib.asynccontextmanager
async def webhook_agency(
    services: Settings,
    pool: asyncpg.Pool,
    tmp_path: Path,
    bus_url: str,
    *,
    retry_window: timedelta = timedelta(hours=24),
) -> AsyncIterator[Agency]:
    """A newly onboarded agency told of deaths (statutory) by webhook, its reference
    receiver on HTTPS posting receipts to the bus at ``bus_url`` with its own OAuth2
    client, and the bus's bridge for it. Its subscription is suspended after."""
    name = f"whk-{uuid.uuid4().hex[:8]}"
    await onboard_agency(services, pool, name, ["DeathRegistered"], by="tests")
    await upsert_subscription(
        pool,
        agency=name,
        event_type="DeathRegistered",
        legal_basis="statutory",
        statute="Test Act 2026 s.1",
        fields=None,
        condition=None,
    )
    tls = loopback_server_tls(tmp_path, "webhook-agency")
    ca, cert, key = tls.ca_file, tls.certificate_file, tls.key_file
    settings = services.model_copy(
        update={
            "webhook_cafile": ca,
            "webhook_timeout_seconds": TIMEOUT_SECONDS,
            "webhook_first_retry_seconds": 0.2,
        }
    )
    sealer = PayloadSealer.from_settings(services)
    faults, applied = Faults(), Applied()
    # The port is known only once it listens; the secret only once the endpoint is set.
    secrets: list[str] = []
    client = await create_client(pool, name, by="tests")
    receipts = ReceiptClient(bus_url, client.client_id, client.client_secret)
    receiver = create_receiver(
        pool,
        name,
        secrets,
        applied,
        keys=KeyRing.from_database(pool),
        consent_keys=KeyRing.consent_from_database(pool),
        receipts=receipts,
    )
    stop = asyncio.Event()
    async with _https(_faulty(receiver, faults), cert, key) as port:
        url = f"https://127.0.0.1:{port}/events"
        secret = await set_endpoint(pool, sealer, name, url, by="tests", retry_window=retry_window)
        assert secret is not None and secret.startswith("whsec_")
        secrets.append(secret)
        # A breaker that opens after 3 failures for a second or two, so a test sees it close again.
        breaker = CircuitBreaker(threshold=3, cool_down=1.0, longest=2.0)
        bridge = asyncio.create_task(WebhookBridge(settings, pool, name, breaker=breaker).run(stop))
        try:
            yield Agency(name, url, secret, applied, faults, settings)
        finally:
            stop.set()
            await bridge
            await receipts.aclose()
            await pool.execute("UPDATE subscription SET status = 'suspended' WHERE agency = $1", name)


async def _register_death(intake: httpx.AsyncClient) -> dict[str, Any]:
    body = death_registration(
        deceased={
            "given_names": "Ada",
            "family_name": "Webhook",
            "date_of_birth": "1941-03-02",
            "nino": random_nino(),
        }
    )
    response = await intake.post("/v1/death-registrations", json=body)
    assert response.status_code == 201, response.text
    accepted: dict[str, Any] = response.json()
    return accepted


def _status_of(
    pool: asyncpg.Pool, agency: str, event_ids: list[str]
) -> Callable[[], Awaitable[dict[str, str]]]:
    async def check() -> dict[str, str]:
        rows = await pool.fetch(
            "SELECT event_id, status FROM webhook_delivery WHERE agency = $1 AND event_id = ANY($2::uuid[])",
            agency,
            event_ids,
        )
        return {str(r["event_id"]): r["status"] for r in rows}

    return check


async def _until_all(
    pool: asyncpg.Pool, agency: str, event_ids: list[str], status: str, timeout: float
) -> None:
    check = _status_of(pool, agency, event_ids)

    async def done() -> bool:
        found = await check()
        return len(found) == len(event_ids) and set(found.values()) == {status}

    await eventually(done, timeout=timeout, what=f"every delivery to be {status}")


async def test_a_death_reaches_a_webhook_agency_and_its_receipt_shows_in_status(
    services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with webhook_agency(services, pool, tmp_path, str(intake.base_url)) as agency:
        accepted = await _register_death(intake)
        event_id = accepted["event_id"]
        await _until_all(pool, agency.name, [event_id], "delivered", timeout=60)
        assert agency.applied.times == {event_id: 1}

        async def receipts() -> set[str] | None:
            rows = await pool.fetch(
                "SELECT outcome FROM delivery_receipt WHERE event_id = $1 AND agency = $2",
                uuid.UUID(event_id),
                agency.name,
            )
            found = {r["outcome"] for r in rows}
            return found if {"RECEIVED", "APPLIED"} <= found else None

        # RECEIVED from the bridge (the endpoint took it), APPLIED posted by the agency over HTTPS.
        assert await eventually(receipts, timeout=30, what="the receipts stored") == {"RECEIVED", "APPLIED"}
        # The sealed copy of the event is gone once delivered; the log keeps the attempt.
        assert (
            await pool.fetchval(
                "SELECT value FROM webhook_delivery WHERE agency = $1 AND event_id = $2",
                agency.name,
                uuid.UUID(event_id),
            )
            is None
        )

        code, out = await asyncio.to_thread(
            tuo_cli, services, "status", accepted["reference"], "--reason", "checking a test event"
        )
        assert code == 0, out
        row = next(line for line in out.splitlines() if agency.name in line and "delivered" in line)
        assert "applied" in row, out
        assert f"Webhook to {agency.name}: delivered" in out and "after 1 attempt" in out, out

        # The citizen's "who was told" page reads the same: told, and what the agency said.
        subject = await pool.fetchval(
            "SELECT subject_id FROM intake_record WHERE event_id = $1", uuid.UUID(event_id)
        )
        [reported] = [
            e
            for e in await received(pool, subject, None)
            if any(d.agency == agency.name for d in e.deliveries)
        ]
        [told] = [d for d in reported.deliveries if d.agency == agency.name]
        assert told.told and told.receipt == "applied", told
        assert told.receipt_words == "They confirmed they have updated their records."

        code, out = await asyncio.to_thread(tuo_cli, services, "webhooks", "log", agency.name)
        assert code == 0, out
        [attempt] = [line for line in out.splitlines() if event_id in line]
        assert accepted["reference"] in attempt and " 200 " in attempt and "delivered" in attempt, out
        code, out = await asyncio.to_thread(tuo_cli, services, "webhooks", "list")
        assert code == 0 and agency.name in out and agency.url in out, out


async def test_an_endpoint_down_then_back_gets_every_event_once_and_every_attempt_is_logged(
    services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with webhook_agency(services, pool, tmp_path, str(intake.base_url)) as agency:
        agency.faults.mode = "500"
        event_ids = [(await _register_death(intake))["event_id"] for _ in range(3)]

        async def failed_attempts(at_least: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                n = await pool.fetchval(
                    "SELECT count(*) FROM webhook_attempt WHERE agency = $1 AND NOT succeeded", agency.name
                )
                return bool(n >= at_least)

            return check

        await eventually(await failed_attempts(6), timeout=60, what="attempts answered 500")
        agency.faults.mode = "hang"  # then it stops answering at all

        async def timed_out() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT count(*) FROM webhook_attempt"
                    " WHERE agency = $1 AND error LIKE 'no answer within%'",
                    agency.name,
                )
            )

        await eventually(timed_out, timeout=60, what="an attempt that timed out")
        assert agency.applied.times == {}
        agency.faults.mode = "ok"
        await _until_all(pool, agency.name, event_ids, "delivered", timeout=120)
        assert agency.applied.times == dict.fromkeys(event_ids, 1)

        rows = await pool.fetch(
            "SELECT event_id, attempt, status_code, error, succeeded FROM webhook_attempt WHERE agency = $1"
            " ORDER BY event_id, attempt",
            agency.name,
        )
        for event_id in event_ids:
            mine = [r for r in rows if str(r["event_id"]) == event_id]
            assert [r["attempt"] for r in mine] == list(range(1, len(mine) + 1))  # none missing
            assert [r["succeeded"] for r in mine] == [False] * (len(mine) - 1) + [True]
            assert mine[-1]["status_code"] == 200
        assert {r["status_code"] for r in rows if not r["succeeded"]} >= {500}
        assert any(r["error"] and "no answer within" in r["error"] for r in rows), [dict(r) for r in rows]
        count = await pool.fetchval(
            "SELECT attempts FROM webhook_delivery WHERE agency = $1 AND event_id = $2",
            agency.name,
            uuid.UUID(event_ids[0]),
        )
        assert count == len([r for r in rows if str(r["event_id"]) == event_ids[0]])


async def test_a_second_bridge_for_the_agency_waits_and_no_event_is_posted_twice(
    services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with webhook_agency(services, pool, tmp_path, str(intake.base_url)) as agency:
        stop = asyncio.Event()
        second = asyncio.create_task(WebhookBridge(agency.settings, pool, agency.name).run(stop))
        try:
            event_ids = [(await _register_death(intake))["event_id"] for _ in range(4)]
            await _until_all(pool, agency.name, event_ids, "delivered", timeout=60)
        finally:
            stop.set()
            await second
        # Every request the endpoint got is an attempt the one delivering bridge logged.
        logged = await pool.fetch(
            "SELECT event_id::text, count(*) AS n FROM webhook_attempt WHERE agency = $1 GROUP BY event_id",
            agency.name,
        )
        assert {e: agency.faults.requests[e] for e in event_ids} == {r["event_id"]: r["n"] for r in logged}
        assert agency.applied.times == dict.fromkeys(event_ids, 1)


async def test_an_endpoint_down_past_the_retry_window_leaves_a_dead_letter_and_an_overdue_flag(
    services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with webhook_agency(
        services, pool, tmp_path, str(intake.base_url), retry_window=timedelta(seconds=3)
    ) as agency:
        agency.faults.mode = "500"
        accepted = await _register_death(intake)
        await _until_all(pool, agency.name, [accepted["event_id"]], "dead", timeout=60)
        assert agency.applied.times == {}
        flagged = await pool.fetchval(
            "SELECT count(*) FROM receipt_overdue"
            " WHERE event_id = $1 AND agency = $2 AND receipted_at IS NULL",
            uuid.UUID(accepted["event_id"]),
            agency.name,
        )
        assert flagged == 1
        letters = await read_topic(services, Topics(services.topic_prefix).agency_dead_letters(agency.name))
        [letter] = [r for r in letters if header(r, "ce_id") == accepted["event_id"]]
        reason = header(letter, "tuo_dlq_reason") or ""
        assert "did not take it" in reason and "HTTP 500" in reason, reason
        code, out = await asyncio.to_thread(
            tuo_cli, services, "status", accepted["reference"], "--reason", "checking a test event"
        )
        assert code == 0 and f"Webhook to {agency.name}: given up" in out, out

        # Once it is back, an operator sends it again: a new copy is queued afresh, its
        # attempts numbered on from the earlier ones, and this time it is applied.
        agency.faults.mode = "ok"
        given_up_after = await pool.fetchval(
            "SELECT attempts FROM webhook_delivery WHERE agency = $1 AND event_id = $2",
            agency.name,
            uuid.UUID(accepted["event_id"]),
        )
        code, out = await asyncio.to_thread(
            tuo_cli,
            services,
            "receipts",
            "redeliver",
            agency.name,
            "--reference",
            accepted["reference"],
            "--reason",
            "endpoint back after the outage",
            "--by",
            "tests",
        )
        assert code == 0, out
        await _until_all(pool, agency.name, [accepted["event_id"]], "delivered", timeout=60)
        assert agency.applied.times == {accepted["event_id"]: 1}
        numbers = [
            r["attempt"]
            for r in await pool.fetch(
                "SELECT attempt FROM webhook_attempt WHERE agency = $1 AND event_id = $2 ORDER BY attempt",
                agency.name,
                uuid.UUID(accepted["event_id"]),
            )
        ]
        assert numbers == list(range(1, given_up_after + 2)), numbers


async def test_the_reference_receiver_refuses_forged_replayed_oversized_and_tampered_requests(
    services: Settings, pool: asyncpg.Pool
) -> None:
    agency = f"whk-{uuid.uuid4().hex[:8]}"
    secret = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTEyMzQ="
    applied = Applied()
    app = create_receiver(
        pool,
        agency,
        [secret],
        applied,
        keys=KeyRing.from_database(pool),
        consent_keys=KeyRing.consent_from_database(pool),
    )
    key = await office_key(pool, services)
    event_id, value, kafka_headers = death_message(f"subject-{uuid.uuid4().hex}", random_nino(), key=key)
    forwarded = forwarded_headers(kafka_headers)

    def signed(body: bytes, *, with_secret: str = secret, at: datetime | None = None) -> dict[str, str]:
        return http_headers(
            forwarded,
            content_type=AVRO,
            webhook_id=event_id,
            body=body,
            secrets=[with_secret],
            now=at or datetime.now(UTC),
        )

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://agency") as client:
        forged = await client.post(
            "/events",
            content=value,
            headers=signed(value, with_secret="whsec_" + "Zm9yZ2VkLWZvcmdlZC1mb3JnZWQ="),
        )
        assert forged.status_code == 401, forged.text
        unsigned = await client.post("/events", content=value, headers={"content-type": AVRO})
        assert unsigned.status_code == 401
        stale = await client.post(
            "/events", content=value, headers=signed(value, at=datetime.now(UTC) - timedelta(minutes=6))
        )
        assert stale.status_code == 401 and "too old" in stale.json()["detail"]
        huge = b"\x00" * (MAX_BODY + 1)
        assert (await client.post("/events", content=huge, headers=signed(huge))).status_code == 413
        # Signed by the bus with the agency's secret, but a field changed after the office signed it.
        tampered = value.replace(b"Example", b"Exampl3") if b"Example" in value else value[:-1] + b"\x01"
        refused = await client.post("/events", content=tampered, headers=signed(tampered))
        assert refused.status_code == 422, refused.text
        assert applied.times == {}

        first = await client.post("/events", content=value, headers=signed(value))
        assert first.status_code == 200, first.text
        assert first.json() == {
            "event_id": event_id,
            "outcome": "APPLIED",
            "reason": None,
            "duplicate": False,
        }
        again = await client.post("/events", content=value, headers=signed(value))  # the bridge retrying
        assert again.status_code == 200 and again.json()["duplicate"] is True
        assert applied.times == {event_id: 1}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["webhooks", "set", "hmrc", "http://127.0.0.1/hook"], "must start with https://"),
        (["webhooks", "set", "hmrc", "not a url"], "spaces"),
        (["webhooks", "set", "no-such-agency", "https://127.0.0.1/hook"], "no agency 'no-such-agency'"),
        (
            ["webhooks", "set", "hmrc", "https://127.0.0.1/hook", "--format", "xml"],
            "--format must be avro or json",
        ),
        (["webhooks", "rotate-secret", "hmrc"], "hmrc has no webhook endpoint"),
    ],
    ids=["http", "spaces", "unknown-agency", "format", "rotate-without-endpoint"],
)
def test_webhook_commands_refuse_bad_input_clearly(
    services: Settings, pool: asyncpg.Pool, args: list[str], message: str
) -> None:
    code, out = tuo_cli(services, *args)
    assert code == 1 and message in out, out
    assert "Traceback" not in out


def test_webhooks_log_of_an_agency_with_no_attempts_says_so(services: Settings, pool: asyncpg.Pool) -> None:
    code, out = tuo_cli(services, "webhooks", "log", "hmrc")
    assert code == 0 and "No webhook attempts to hmrc." in out, out
