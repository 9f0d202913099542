"""The transactional outbox: messages written to PostgreSQL in the same transaction as
the change they announce, then published to Kafka by the relay (``producers.relay``).

Everything that publishes this way goes through ``append``: intake's events, the
consent pages' changes, operators' redeliveries and dead-letter redrives. It writes
the rows in one statement and wakes the relay, whose LISTEN hears it on commit (a
notification inside a transaction that rolls back is never sent).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

import asyncpg

CHANNEL = "tuo_outbox"  # the relay LISTENs here

Headers = Sequence[tuple[str, bytes | str]] | str  # pairs, or the JSON an earlier row stored


@dataclass(frozen=True)
class OutboxMessage:
    event_id: UUID
    topic: str
    key: bytes
    value: bytes  # sealed for this event id: the relay opens it as it publishes
    headers: Headers
    routing_facts: bytes | None = None  # sealed too (router.facts): for replay, never published


def _json(headers: Headers) -> str:
    if isinstance(headers, str):
        return headers
    return json.dumps([[k, v.decode() if isinstance(v, bytes) else v] for k, v in headers])


async def append(conn: asyncpg.Connection, messages: Sequence[OutboxMessage]) -> list[int]:
    """Add ``messages`` to the outbox within the caller's transaction; their row ids, in order."""
    if not messages:
        return []
    rows = await conn.fetch(
        "INSERT INTO outbox (event_id, topic, message_key, message_value, headers, routing_facts)"
        " SELECT event_id, topic, message_key, message_value, headers::jsonb, routing_facts"
        "   FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::bytea[], $5::text[], $6::bytea[])"
        "        WITH ORDINALITY AS m(event_id, topic, message_key, message_value, headers, routing_facts, n)"
        "  ORDER BY n"
        " RETURNING id",
        [m.event_id for m in messages],
        [m.topic for m in messages],
        [m.key for m in messages],
        [m.value for m in messages],
        [_json(m.headers) for m in messages],
        [m.routing_facts for m in messages],
    )
    await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
    return sorted(r["id"] for r in rows)  # bigserial, assigned in the SELECT's order
