"""The outbox relay: publish committed outbox rows to Kafka, then mark them sent.

At-least-once by construction (a crash between the broker's ack and the
``published_at`` update re-sends a row); consumers de-duplicate on ``ce_id``.
Rows are published in id order, so one subject's events stay in order.
"""

from __future__ import annotations

import asyncio
import json

import asyncpg
import structlog

from producers.store import OUTBOX_CHANNEL
from runtime import kafka
from runtime.settings import Settings

log = structlog.get_logger(__name__)

BATCH_SIZE = 500
IDLE_POLL_SECONDS = 1.0


async def publish_pending(pool: asyncpg.Pool, producer: kafka.AIOKafkaProducer) -> int:
    """Publish one batch of unpublished rows; return how many were published."""
    async with pool.acquire() as conn, conn.transaction():
        # SKIP LOCKED lets several relays share the outbox without double-sending a batch.
        rows = await conn.fetch(
            "SELECT id, topic, message_key, message_value, headers FROM outbox"
            " WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
            BATCH_SIZE,
        )
        if not rows:
            return 0
        futures = [
            await producer.send(
                row["topic"],
                value=row["message_value"],
                key=row["message_key"],
                headers=[(k, v.encode()) for k, v in json.loads(row["headers"])],
            )
            for row in rows
        ]
        await asyncio.gather(*futures)
        await conn.execute(
            "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])",
            [row["id"] for row in rows],
        )
    log.info("outbox_published", count=len(rows), last_id=rows[-1]["id"])
    return len(rows)


async def run_relay(settings: Settings, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
    wake = asyncio.Event()

    def on_notify(*_: object) -> None:
        wake.set()

    producer = kafka.producer(settings, client_id="tuo-relay")
    try:
        await producer.start()
        async with pool.acquire() as listener:
            await listener.add_listener(OUTBOX_CHANNEL, on_notify)
            try:
                log.info("relay_started")
                while not stop.is_set():
                    wake.clear()  # before reading, so a notify during the read is not lost
                    if await publish_pending(pool, producer):
                        continue
                    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())]
                    await asyncio.wait(
                        waiters, timeout=IDLE_POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED
                    )
                    for waiter in waiters:
                        waiter.cancel()
            finally:
                await listener.remove_listener(OUTBOX_CHANNEL, on_notify)
    finally:
        await producer.stop()
