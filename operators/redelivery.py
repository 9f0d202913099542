"""Redelivery: an operator sends events again to one agency that has not
receipted them (an overdue delivery, an agency that lost a day's work).

The request is written to the outbox in one transaction with a record of who
asked and why; the relay publishes it to ``tuo.redeliveries`` and the router
routes it to that agency only, judged on today's subscriptions and consent
(consent withdrawn since the first delivery means nothing is sent). The event
keeps its id, so an agency that did receive it answers with a duplicate
receipt and applies nothing twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import asyncpg

from runtime import outbox
from runtime.kafka import Topics
from runtime.outbox import OutboxMessage
from schemas.cloudevents import REDELIVER_TO, REDELIVERY_ID


class RedeliveryRefused(ValueError):
    """The request names events that were never delivered to the agency."""


@dataclass(frozen=True)
class Redelivery:
    event_ids: list[str]
    agency: str


async def overdue_events(pool: asyncpg.Pool, agency: str) -> list[str]:
    """Events flagged overdue for the agency and still without a final receipt."""
    rows = await pool.fetch(
        "SELECT event_id FROM receipt_overdue WHERE agency = $1 AND receipted_at IS NULL ORDER BY due_at",
        agency,
    )
    return [str(r["event_id"]) for r in rows]


async def events_for_references(pool: asyncpg.Pool, references: list[str]) -> list[str]:
    rows = await pool.fetch(
        "SELECT reference, event_id FROM intake_record WHERE reference = ANY($1::text[])", references
    )
    found = {r["reference"]: str(r["event_id"]) for r in rows}
    unknown = [r for r in references if r not in found]
    if unknown:
        raise RedeliveryRefused(f"no event has reference {', '.join(unknown)}")
    return [found[r] for r in references]


async def redeliver(
    pool: asyncpg.Pool,
    topics: Topics,
    *,
    agency: str,
    event_ids: list[str],
    requested_by: str,
    reason: str,
) -> Redelivery:
    """Queue each event for redelivery to ``agency``; all or nothing."""
    reason = reason.strip()
    if not 3 <= len(reason) <= 500:
        raise RedeliveryRefused("give a reason of 3 to 500 characters; it is kept with the redelivery")
    async with pool.acquire() as conn, conn.transaction():
        delivered = {
            str(r["event_id"])
            for r in await conn.fetch(
                "SELECT event_id FROM routing_decision"
                " WHERE agency = $1 AND event_id = ANY($2::uuid[]) AND outcome = 'DELIVERED'"
                " UNION SELECT event_id FROM replay_delivery"  # or an operator's replay sent it
                "  WHERE agency = $1 AND event_id = ANY($2::uuid[])",
                agency,
                event_ids,
            )
        }
        never = [e for e in event_ids if e not in delivered]
        if never:
            raise RedeliveryRefused(
                f"{len(never)} of the events were never delivered to {agency} "
                f"(first: {never[0]}); redelivery only repeats a delivery"
            )
        originals = await conn.fetch(
            "SELECT DISTINCT ON (event_id) event_id, message_key, message_value, headers FROM outbox"
            " WHERE event_id = ANY($1::uuid[]) AND topic = $2 ORDER BY event_id, id",
            event_ids,
            topics.life_events,
        )
        missing = set(event_ids) - {str(o["event_id"]) for o in originals}
        if missing:
            raise RedeliveryRefused(
                f"{len(missing)} of the events have no stored original to send (first: {min(missing)})"
            )
        redeliveries: list[OutboxMessage] = []
        for original in originals:
            redelivery_id = await conn.fetchval(
                "INSERT INTO redelivery (event_id, agency, requested_by, reason)"
                " VALUES ($1, $2, $3, $4) RETURNING id",
                original["event_id"],
                agency,
                requested_by,
                reason,
            )
            headers = [
                [k, v] for k, v in json.loads(original["headers"]) if k not in (REDELIVER_TO, REDELIVERY_ID)
            ]
            headers += [[REDELIVER_TO, agency], [REDELIVERY_ID, str(redelivery_id)]]
            redeliveries.append(
                OutboxMessage(
                    original["event_id"],
                    topics.redeliveries,
                    original["message_key"],
                    original["message_value"],
                    json.dumps(headers),
                )
            )
        await outbox.append(conn, redeliveries)
    return Redelivery(event_ids=[str(o["event_id"]) for o in originals], agency=agency)
