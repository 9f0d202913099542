"""Agencies' webhook endpoints, their signing secrets, and the delivery log, in PostgreSQL
(``runtime/migrations/0032_webhooks.sql``).

A secret is shown once, when it is made, and kept only sealed with the data key. Rotating
makes a new one current; the old one is still signed with (beside the new) until it
expires, so the agency can switch its receiver over without missing a delivery.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

import asyncpg

from consumers.webhooks.requests import FORMATS, SECRET_PREFIX
from runtime.sealing import PayloadSealer

MAX_URL = 2000
DEFAULT_RETRY_WINDOW = timedelta(hours=24)
DEFAULT_IN_FLIGHT = 4
ROTATION_OVERLAP = timedelta(hours=24)


class NotAWebhookUrl(ValueError):
    def __init__(self, url: str, why: str) -> None:
        super().__init__(f"{url[:100]!r} cannot be a webhook endpoint: {why}")


class NoWebhookEndpoint(LookupError):
    def __init__(self, agency: str) -> None:
        super().__init__(f"{agency} has no webhook endpoint; set one with `tuo webhooks set {agency} URL`")


def checked_url(url: str) -> str:
    """``url`` if it can be an endpoint: HTTPS (the events carry personal data), a host,
    no credentials in it, no fragment."""
    url = url.strip()
    if len(url) > MAX_URL:
        raise NotAWebhookUrl(url, f"it is longer than {MAX_URL} characters")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise NotAWebhookUrl(url, "it contains spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme != "https":
        raise NotAWebhookUrl(url, "it must start with https:// (events carry personal data)")
    if not parts.hostname:
        raise NotAWebhookUrl(url, "it names no host")
    if parts.username is not None or parts.password is not None:
        raise NotAWebhookUrl(url, "it must not hold a user name or password")
    if parts.fragment:
        raise NotAWebhookUrl(url, "it must not have a #fragment")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise NotAWebhookUrl(url, "its port is not a number from 1 to 65535") from None
    return url


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode()


def _bound(agency: str) -> bytes:
    return f"webhook-secret:{agency}".encode()


@dataclass(frozen=True)
class Endpoint:
    agency: str
    url: str
    payload_format: str
    max_in_flight: int
    retry_window: timedelta
    secrets: list[str]  # every secret signed with now, newest first


async def set_endpoint(
    pool: asyncpg.Pool,
    sealer: PayloadSealer,
    agency: str,
    url: str,
    *,
    by: str,
    payload_format: str = "avro",
    max_in_flight: int = DEFAULT_IN_FLIGHT,
    retry_window: timedelta = DEFAULT_RETRY_WINDOW,
) -> str | None:
    """Deliver ``agency``'s events to ``url`` from now on. Returns the signing secret when
    the agency had none (to give it, once), else None (its secrets stay)."""
    url = checked_url(url)
    if payload_format not in FORMATS:
        raise ValueError(f"payload format must be one of {', '.join(FORMATS)}, not {payload_format!r}")
    async with pool.acquire() as conn, conn.transaction():
        if await conn.fetchval("SELECT status FROM agency_account WHERE agency = $1", agency) is None:
            raise LookupError(f"no agency {agency!r} is onboarded; see `tuo agencies add`")
        await conn.execute(
            "INSERT INTO webhook_endpoint"
            " (agency, url, payload_format, max_in_flight, retry_window, created_by, updated_by)"
            " VALUES ($1, $2, $3, $4, $5, $6, $6)"
            " ON CONFLICT (agency) DO UPDATE SET url = $2, payload_format = $3, max_in_flight = $4,"
            " retry_window = $5, updated_by = $6, updated_at = now()",
            agency,
            url,
            payload_format,
            max_in_flight,
            retry_window,
            by,
        )
        if await conn.fetchval("SELECT count(*) FROM webhook_secret WHERE agency = $1", agency):
            return None
        secret = new_secret()
        await conn.execute(
            "INSERT INTO webhook_secret (agency, sealed, created_by) VALUES ($1, $2, $3)",
            agency,
            sealer.seal(secret.encode(), _bound(agency)),
            by,
        )
        return secret


async def rotate_secret(
    pool: asyncpg.Pool, sealer: PayloadSealer, agency: str, *, by: str, overlap: timedelta = ROTATION_OVERLAP
) -> str:
    """A new current secret; the ones in use now are still signed with for ``overlap``."""
    secret = new_secret()
    async with pool.acquire() as conn, conn.transaction():
        if await conn.fetchval("SELECT 1 FROM webhook_endpoint WHERE agency = $1 FOR UPDATE", agency) is None:
            raise NoWebhookEndpoint(agency)
        await conn.execute(
            "UPDATE webhook_secret SET expires_at = now() + $2::interval"
            " WHERE agency = $1 AND (expires_at IS NULL OR expires_at > now() + $2::interval)",
            agency,
            overlap,
        )
        await conn.execute(
            "INSERT INTO webhook_secret (agency, sealed, created_by) VALUES ($1, $2, $3)",
            agency,
            sealer.seal(secret.encode(), _bound(agency)),
            by,
        )
    return secret


async def endpoint_of(pool: asyncpg.Pool, sealer: PayloadSealer, agency: str) -> Endpoint | None:
    row = await pool.fetchrow(
        "SELECT url, payload_format, max_in_flight, retry_window FROM webhook_endpoint WHERE agency = $1",
        agency,
    )
    if row is None:
        return None
    sealed = await pool.fetch(
        "SELECT sealed FROM webhook_secret WHERE agency = $1 AND (expires_at IS NULL OR expires_at > now())"
        " ORDER BY id DESC",
        agency,
    )
    return Endpoint(
        agency,
        row["url"],
        row["payload_format"],
        row["max_in_flight"],
        row["retry_window"],
        [sealer.open(r["sealed"], _bound(agency)).decode() for r in sealed],
    )


async def webhook_agencies(pool: asyncpg.Pool) -> list[str]:
    """Agencies told by webhook (not suspended): the bus runs a bridge for each."""
    rows = await pool.fetch(
        "SELECT e.agency FROM webhook_endpoint e JOIN agency_account a USING (agency)"
        " WHERE a.status = 'active' ORDER BY e.agency"
    )
    return [r["agency"] for r in rows]


# --- the delivery log ---------------------------------------------------------------------------


async def attempts(pool: asyncpg.Pool, agency: str, limit: int = 50) -> list[asyncpg.Record]:
    """The latest attempts to deliver to ``agency``, newest first, with each event's reference."""
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT a.started_at, a.event_id, a.attempt, a.latency_ms, a.status_code, a.error, a.succeeded,"
        "       d.event_type, d.status AS delivery, i.reference"
        "  FROM webhook_attempt a JOIN webhook_delivery d USING (agency, event_id)"
        "  LEFT JOIN intake_record i ON i.event_id = a.event_id"
        " WHERE a.agency = $1 ORDER BY a.started_at DESC, a.attempt DESC LIMIT $2",
        agency,
        limit,
    )
    return rows


async def summary(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    """Per webhook agency: its endpoint, deliveries waiting, delivered and given up on,
    and its last attempt."""
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT e.agency, e.url, e.payload_format,"
        "       count(*) FILTER (WHERE d.status = 'pending') AS pending,"
        "       count(*) FILTER (WHERE d.status = 'delivered') AS delivered,"
        "       count(*) FILTER (WHERE d.status = 'dead') AS dead,"
        "       (SELECT max(started_at) FROM webhook_attempt a WHERE a.agency = e.agency) AS last_attempt"
        "  FROM webhook_endpoint e LEFT JOIN webhook_delivery d USING (agency)"
        " GROUP BY e.agency, e.url, e.payload_format ORDER BY e.agency"
    )
    return rows


async def deliveries_of(pool: asyncpg.Pool, event_id: str) -> list[asyncpg.Record]:
    """One event's webhook deliveries, per agency (for ``tuo status``)."""
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT d.agency, d.status, d.attempts, d.finished_at, d.next_attempt_at,"
        "       (SELECT coalesce(a.status_code::text, a.error) FROM webhook_attempt a"
        "         WHERE a.agency = d.agency AND a.event_id = d.event_id"
        "         ORDER BY a.attempt DESC LIMIT 1) AS last_answer"
        "  FROM webhook_delivery d WHERE d.event_id = $1::uuid ORDER BY d.agency",
        event_id,
    )
    return rows
