"""Webhook delivery: the bridge against a bare httpx POST loop, to the same reference
receiver over HTTPS, in one run.

    .venv/bin/python -m bench.webhooks [--events 2000] [--in-flight 8]

Starts its own local stack (Kafka over TLS with SASL/SCRAM and PostgreSQL, in a scratch
state directory), onboards one agency, and starts the reference webhook receiver
(``consumers.webhook_agency``: Standard Webhooks check, the office's Ed25519 signatures
checked, each event applied once in its inbox) as its own process, over HTTPS with a
local CA. Then, with 2 × N signed death messages (a new person each):

  (a) bare loop: ``--in-flight`` workers POST the first N straight from memory with one
      httpx client, each request with its CloudEvents and signature headers and its
      Standard Webhooks signature made then: the fastest way to put those bytes in front
      of that receiver;
  (b) the bridge: the other N are put on the agency's topic first; a ``WebhookBridge``
      (``--in-flight`` at once, as the endpoint allows) then reads them, queues them in
      PostgreSQL, POSTs each, sends its RECEIVED receipt to Kafka and logs the attempt.
      Timed from its start until the N-th delivery is recorded.

Both count what arrived before printing a rate: events the receiver applied (its inbox),
answers of 200, and for the bridge the deliveries logged as delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench.proof import prove
from bench.scratch import BENCH_USER, ScratchStack, deploy_bus, scratch_stack
from consumers import DeliveredEvent, KeyRing
from consumers.webhook_agency import create_receiver
from consumers.webhooks import WebhookBridge, set_endpoint
from consumers.webhooks.requests import AVRO, forwarded_headers, http_headers
from devstack.certificates import loopback_server_tls
from devstack.processes import free_port
from producers.office_keys import SigningKey
from runtime import kafka
from runtime.database import migrate, open_pool
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from tests.support import death_message, office_key

AGENCY = "webhook-bench"
OFFICE = "bench-office"
PREFIX = "whbench"

Message = tuple[str, str, bytes, list[tuple[str, bytes]]]  # event id, subject, value, Kafka headers


def _death(key: SigningKey) -> Message:
    """A death of a new person, signed by the office like intake signs one (``key``)."""
    subject = f"n-{uuid.uuid4().hex}"
    event_id, value, headers = death_message(subject, key=key)
    return event_id, subject, value, headers


async def _applies(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
    """The benchmark agency's handler: applying is recording it (the inbox row)."""


def _receiver(settings: Settings, secret: str, port: int, cert: str, key: str) -> None:
    import uvicorn

    async def serve() -> None:
        pool = await open_pool(settings)
        app = create_receiver(
            pool,
            AGENCY,
            [secret],
            _applies,
            keys=KeyRing.from_database(pool),
            consent_keys=KeyRing.consent_from_database(pool),
        )
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            ssl_certfile=cert,
            ssl_keyfile=key,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        await uvicorn.Server(config).serve()
        await pool.close()

    asyncio.run(serve())


async def _until_listening(url: str, ca: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(verify=str(ca)) as client:
        while True:
            try:
                await client.get(url)
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


async def _bare_loop(
    url: str, ca: Path, secret: str, messages: list[Message], workers: int
) -> tuple[float, int]:
    """POST every message as fast as ``workers`` concurrent requests allow; (seconds, 200s)."""
    queue = iter(messages)
    ok = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal ok
        for event_id, _, value, headers in queue:
            signed = http_headers(
                forwarded_headers(headers),
                content_type=AVRO,
                webhook_id=event_id,
                body=value,
                secrets=[secret],
                now=datetime.now(UTC),
            )
            answer = await client.post(url, content=value, headers=signed)
            ok += answer.status_code == 200

    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    async with httpx.AsyncClient(verify=str(ca), limits=limits, timeout=30) as client:
        began = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(workers)))
        return time.perf_counter() - began, ok


async def _applied(pool: asyncpg.Pool, event_ids: list[str]) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM agency.inbox"
        " WHERE agency = $1 AND event_id = ANY($2::uuid[]) AND outcome = 'APPLIED'",
        AGENCY,
        event_ids,
    )
    return count


async def measure(stack: ScratchStack, events: int, in_flight: int) -> dict[str, Any]:
    settings = stack.settings(PREFIX)
    pool = await open_pool(settings)
    receiver: Any = None  # the receiver's process, once started
    try:
        await migrate(pool, settings)
        sealer = PayloadSealer.from_settings(settings)
        key = await office_key(pool, settings, OFFICE)
        await deploy_bus(settings, pool, [AGENCY])
        tls = loopback_server_tls(stack.state_dir, "webhook-bench")
        ca, cert, tls_key = tls.ca_file, tls.certificate_file, tls.key_file
        port = free_port()
        url = f"https://127.0.0.1:{port}/events"
        secret = await set_endpoint(pool, sealer, AGENCY, url, by="bench", max_in_flight=in_flight)
        assert secret is not None
        receiver = multiprocessing.get_context("spawn").Process(
            target=_receiver, args=(settings, secret, port, str(cert), str(tls_key)), daemon=True
        )
        receiver.start()
        await _until_listening(f"https://127.0.0.1:{port}/", ca)

        bare_messages = [_death(key) for _ in range(events)]
        bridged = [_death(key) for _ in range(events)]
        bare_seconds, bare_ok = await _bare_loop(url, ca, secret, bare_messages, in_flight)
        bare_ids = [m[0] for m in bare_messages]
        bare_applied = await _applied(pool, bare_ids)
        prove(
            "webhooks bare loop",
            events,
            min(bare_ok, bare_applied),
            f"200 answers {bare_ok}; applied {bare_applied}",
        )

        producer = kafka.producer(settings, principal=BENCH_USER, client_id="bench-webhooks")
        await producer.start()
        try:
            topic = kafka.Topics(PREFIX).agency(AGENCY)
            sent = await kafka.send_many(producer, topic, [(m[1].encode(), m[2], m[3]) for m in bridged])
            await asyncio.gather(*sent)
        finally:
            await producer.stop()
        bridged_ids = [m[0] for m in bridged]
        bridge_settings = settings.model_copy(update={"webhook_cafile": ca, "webhook_timeout_seconds": 30})
        stop = asyncio.Event()
        began = time.perf_counter()
        running = asyncio.create_task(WebhookBridge(bridge_settings, pool, AGENCY).run(stop))
        delivered = 0
        deadline = time.monotonic() + 600
        while delivered < events and time.monotonic() < deadline and not running.done():
            await asyncio.sleep(0.05)
            delivered = await pool.fetchval(
                "SELECT count(*) FROM webhook_delivery WHERE agency = $1 AND status = 'delivered'", AGENCY
            )
        bridge_seconds = time.perf_counter() - began
        stop.set()
        await running
        bridge_applied = await _applied(pool, bridged_ids)
        prove(
            "webhooks bridge",
            events,
            min(delivered, bridge_applied),
            f"deliveries logged as delivered {delivered}; applied by the receiver {bridge_applied}",
        )
        attempts = await pool.fetchval("SELECT count(*) FROM webhook_attempt WHERE agency = $1", AGENCY)
    finally:
        if receiver is not None:
            receiver.terminate()
            receiver.join(10)
        await pool.close()

    bare_rate, bridge_rate = events / bare_seconds, events / bridge_seconds
    print(
        f"webhooks: {events} signed deaths each way to the reference receiver over HTTPS,"
        f" {in_flight} in flight"
    )
    print(f"  bare httpx POST loop (signed, from memory)           {bare_rate:8,.0f} deliveries/s")
    print(f"  webhook bridge (topic → PostgreSQL → POST → receipt) {bridge_rate:8,.0f} deliveries/s")
    print(f"  ratio bridge / bare loop: {bridge_rate / bare_rate:.2f}  ({attempts} attempts logged)")
    return {
        "events": events,
        "in_flight": in_flight,
        "sent": events,
        "arrived": min(delivered, bridge_applied),
        "proof": "deliveries logged as delivered and events applied in the receiver's inbox",
        "bare": {"sent": events, "arrived": min(bare_ok, bare_applied)},
        "stages": {},
        "bridge_per_s": round(bridge_rate, 1),
        "bare_per_s": round(bare_rate, 1),
        "ratio": round(bridge_rate / bare_rate, 3),
        "attempts": attempts,
    }


def main(events: int = 2000, in_flight: int = 8) -> dict[str, Any]:
    with scratch_stack() as stack:
        return asyncio.run(measure(stack, events, in_flight))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=8)
    args = parser.parse_args()
    main(args.events, args.in_flight)
