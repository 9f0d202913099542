"""Prometheus metrics: the bus's receipt figures from PostgreSQL, and each
process's own counters.

``receipt_metrics`` reads the database at scrape time (the intake's ``/metrics``),
so its figures are right however the components are spread over processes and
survive restarts: receipts stored per agency and outcome, repeated deliveries, and
deliveries whose receipt is overdue (open now, and flagged since the start).

``REGISTRY`` holds what the components of this process did since it started
(events accepted, routed, withheld, dead-lettered, receipts, receipt latency) and
the lag of its Kafka consumers; every process that ``operators.services`` starts
serves it on ``TUO_METRICS_PORT`` (see ``operators.metrics_endpoint``). Labels name
agencies, event types, outcomes, reasons and components, never a person.
"""

from __future__ import annotations

import asyncio

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import IllegalStateError
from aiokafka.structs import TopicPartition
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

log = structlog.get_logger(__name__)


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


# This process's own counters: what its components did since it started. One
# registry per process, so every bus a process starts counts into the same one
# (each `tuo run` is one process; Prometheus adds the processes up).
REGISTRY = CollectorRegistry(auto_describe=True)
# No *_created series: Prometheus tells a restart by the counter's reset.
disable_created_metrics()  # type: ignore[no-untyped-call]

EVENTS_ACCEPTED = Counter(
    "tuo_events_accepted",
    "Events accepted at intake (recorded with their outbox row; an idempotent repeat is not counted).",
    ["event_type"],
    registry=REGISTRY,
)
EVENTS_PUBLISHED = Counter(
    "tuo_events_published", "Outbox rows the relay published to Kafka (committed).", registry=REGISTRY
)
EVENTS_ROUTED = Counter(
    "tuo_events_routed",
    "Life events the router decided on, in committed transactions (not redeliveries).",
    ["event_type"],
    registry=REGISTRY,
)
DELIVERIES = Counter(
    "tuo_deliveries",
    "Copies of events the router sent to an agency's topic, redeliveries included (committed).",
    ["agency"],
    registry=REGISTRY,
)
WITHHELD = Counter(
    "tuo_withheld",
    "Routing decisions that withheld an event from an agency, by reason (committed).",
    ["agency", "reason"],
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "tuo_dead_letters",
    "Messages a component sent to dead letters (component as in the dead letter's header).",
    ["component"],
    registry=REGISTRY,
)
RECEIPTS_SENT = Counter(
    "tuo_receipts_sent",
    "Delivery receipts the agency SDK sent and the broker acknowledged, by outcome.",
    ["agency", "outcome"],
    registry=REGISTRY,
)
WEBHOOK_ATTEMPTS = Counter(
    "tuo_webhook_attempts",
    "Attempts to POST an event to an agency's webhook endpoint, by outcome (delivered, failed, given_up).",
    ["agency", "outcome"],
    registry=REGISTRY,
)
RECEIPTS_STORED = Counter(
    "tuo_receipts_stored",
    "Delivery receipts the receipt tracker stored (a repeated receipt is not counted), by outcome.",
    ["agency", "outcome"],
    registry=REGISTRY,
)
RECEIPT_LATENCY = Histogram(
    "tuo_receipt_latency_seconds",
    "From the routing decision that delivered an event to the agency's final receipt "
    "(APPLIED or REJECTED), observed when the tracker has stored both.",
    ["agency"],
    # Seconds for a consumer keeping up, hours to days for an agency that answers by hand.
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 2 * 86400, 7 * 86400),
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "tuo_consumer_lag",
    "Messages a consumer of this process has yet to read: last stable offset minus its "
    "position, summed over its assigned partitions; read at scrape time.",
    ["group", "topic"],
    registry=REGISTRY,
)


class ConsumerLag:
    """The Kafka consumers this process runs, for ``tuo_consumer_lag``."""

    def __init__(self) -> None:
        self.consumers: dict[int, tuple[str, AIOKafkaConsumer]] = {}

    def watch(self, group: str, consumer: AIOKafkaConsumer) -> None:
        """Report ``consumer``'s lag until ``forget``; call both where it is started and stopped."""
        self.consumers[id(consumer)] = (group, consumer)

    def forget(self, consumer: AIOKafkaConsumer) -> None:
        self.consumers.pop(id(consumer), None)

    async def refresh(self) -> None:
        """Set the gauge from every watched consumer's assigned partitions. A partition
        not fetched from yet, or changing hands right now, is left out of this scrape."""
        ends: list[tuple[str, AIOKafkaConsumer, TopicPartition, int]] = []
        for group, consumer in list(self.consumers.values()):
            for tp in consumer.assignment():
                end = consumer.last_stable_offset(tp)  # read_committed: what it can read
                if end is None or end < 0:
                    end = consumer.highwater(tp)
                if end is not None:
                    ends.append((group, consumer, tp, end))
        # All at once: a position still being reset waits, and the scrape waits for it once.
        positions = await asyncio.gather(
            *(
                asyncio.wait_for(consumer.position(tp), POSITION_TIMEOUT_SECONDS)
                for _, consumer, tp, _ in ends
            ),
            return_exceptions=True,
        )
        lag: dict[tuple[str, str], int] = {}
        for (group, _, tp, end), position in zip(ends, positions, strict=True):
            if isinstance(position, IllegalStateError | TimeoutError):
                continue
            if isinstance(position, Exception):
                # A consumer stopping or restarting between the snapshot and now: its
                # lag is left out of this scrape rather than failing the whole scrape.
                log.warning("consumer_lag_unread", group=group, error=type(position).__name__)
                continue
            if isinstance(position, BaseException):
                raise position
            lag[(group, tp.topic)] = lag.get((group, tp.topic), 0) + max(0, end - position)
        CONSUMER_LAG.clear()  # groups and topics no longer read here disappear
        for (group, topic), value in lag.items():
            CONSUMER_LAG.labels(group=group, topic=topic).set(value)


POSITION_TIMEOUT_SECONDS = 1.0
LAG = ConsumerLag()


async def process_metrics() -> bytes:
    """This process's registry in the Prometheus text format, consumer lag read now."""
    await LAG.refresh()
    return generate_latest(REGISTRY)
