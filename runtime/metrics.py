"""Prometheus metrics, read from PostgreSQL at scrape time.

The figures come from the database rather than from one process's memory, so
they are right however the components are spread over processes and survive
restarts: receipts stored per agency and outcome, repeated deliveries, and
deliveries whose receipt is overdue (open now, and flagged since the start).
"""

from __future__ import annotations

import asyncpg
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Snapshot(Collector):
    def __init__(self, families: list[GaugeMetricFamily | CounterMetricFamily]) -> None:
        self.families = families

    def collect(self):  # type: ignore[no-untyped-def]
        return iter(self.families)


async def receipt_metrics(pool: asyncpg.Pool) -> bytes:
    async with pool.acquire() as conn:
        receipts = await conn.fetch(
            "SELECT agency, outcome, count(*) AS n FROM delivery_receipt GROUP BY agency, outcome"
        )
        duplicates = await conn.fetch("SELECT agency, count(*) AS n FROM receipt_duplicate GROUP BY agency")
        overdue = await conn.fetch(
            "SELECT agency, count(*) FILTER (WHERE receipted_at IS NULL) AS open, count(*) AS flagged"
            "  FROM receipt_overdue GROUP BY agency"
        )
    received = CounterMetricFamily(
        "tuo_receipts", "Delivery receipts stored, by agency and outcome.", labels=["agency", "outcome"]
    )
    for r in receipts:
        received.add_metric([r["agency"], r["outcome"].lower()], r["n"])
    repeated = CounterMetricFamily(
        "tuo_receipt_duplicates", "Receipts for deliveries an agency had already handled.", labels=["agency"]
    )
    for r in duplicates:
        repeated.add_metric([r["agency"]], r["n"])
    open_now = GaugeMetricFamily(
        "tuo_receipts_overdue", "Deliveries past their deadline without a final receipt.", labels=["agency"]
    )
    flagged = CounterMetricFamily(
        "tuo_receipts_overdue_flagged", "Deliveries ever flagged overdue.", labels=["agency"]
    )
    for r in overdue:
        open_now.add_metric([r["agency"]], r["open"])
        flagged.add_metric([r["agency"]], r["flagged"])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot([received, repeated, open_now, flagged]))
    return generate_latest(registry)
