"""Helpers shared by the tests: waiting for an outcome, reading a topic, sample events."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord, TopicPartition

from producers.office_keys import SigningKey
from runtime.settings import Settings
from schemas.validation import today_in_the_uk

T = TypeVar("T")


def test_backend() -> str:
    """Which services the integration tests use: auto (default), local or docker."""
    return os.environ.get("TUO_TEST_BACKEND", "auto")


def docker_engine_reachable() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=20)
    return probe.returncode == 0


async def eventually(
    check: Callable[[], Awaitable[T | None]], timeout: float = 30.0, what: str = "condition"
) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)


async def read_topic(settings: Settings, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every committed message on ``topic`` right now (read_committed, from the start)."""
    consumer = AIOKafkaConsumer(
        topic,  # no group: every partition is assigned to us
        bootstrap_servers=settings.require_bootstrap_servers(),
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        assert topic in await consumer.topics(), f"topic {topic} does not exist"
        partitions: list[TopicPartition] = await eventually(
            _assigned(consumer), timeout=10, what=f"partitions of {topic}"
        )
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: list[ConsumerRecord[bytes, bytes]] = []
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            batch = await consumer.getmany(timeout_ms=1000)
            for part in batch.values():
                records.extend(part)
        return records
    finally:
        await consumer.stop()


def _assigned(consumer: AIOKafkaConsumer) -> Callable[[], Awaitable[list[TopicPartition]]]:
    async def check() -> list[TopicPartition]:
        return sorted(consumer.assignment())

    return check


def header(record: ConsumerRecord[bytes, bytes], name: str) -> str | None:
    for key, value in record.headers:
        if key == name:
            return bytes(value).decode()
    return None


def today() -> date:
    return today_in_the_uk()


def death_registration(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "informant": {"name": "Alex Example", "relationship": "daughter"},
        "channel": "desk",
        "deceased": {
            "given_names": "Pat",
            "family_name": "Example",
            "date_of_birth": "1941-03-02",
            "nino": "AB123456C",
        },
        "date_of_death": (today() - timedelta(days=2)).isoformat(),
        "place_of_death": "Leeds General Infirmary",
        "last_address": {"lines": ["1 Example Street"], "town": "Leeds", "postcode": "LS1 1AA"},
        "consents": [{"agency": "dvla", "choice": "given"}, {"agency": "hmpo", "choice": "refused"}],
    }
    body.update(overrides)
    return body


def random_nino() -> str:
    """A well-formed, made-up National Insurance number, so each test has its own subject."""
    import random

    digits = "".join(random.choice("0123456789") for _ in range(6))
    return f"CE{digits}{random.choice('ABCD')}"


TEST_OFFICE = "test-office"


async def office_key(pool: asyncpg.Pool, office: str = TEST_OFFICE) -> SigningKey:
    """The active signing key of a test registration office, created on first use."""
    from producers.accounts import ensure_office
    from producers.office_keys import active_key

    await ensure_office(pool, office, f"Test register office {office}")
    return await active_key(pool, office)


def death_message(
    subject_id: str, nino: str | None = None, *, key: SigningKey
) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    """A valid life-events message (event id, value, headers) for ``subject_id``,
    built and signed like intake builds one (by ``key``'s office, see ``office_key``),
    for tests and benchmarks that feed the router directly."""
    from schemas import encode
    from schemas.cloudevents import headers_for
    from schemas.signatures import office_source, signature_headers
    from tests.golden.make_vectors import EXAMPLES

    event_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    record: dict[str, Any] = dict(EXAMPLES["DeathRegistered"])
    record["envelope"] = {
        **record["envelope"],
        "event_id": event_id,
        "subject": {"subject_id": subject_id, "nino": nino},
        "recorded_at": now,
        "registration_office": key.office,
    }
    value = encode("DeathRegistered", record)
    headers = headers_for(
        value,
        id=event_id,
        source=office_source(key.office),
        subject=subject_id,
        time=now,
        schema_base_url="http://127.0.0.1:8080",
    )
    headers += signature_headers(key, "DeathRegistered", record, event_id)
    return event_id, value, headers


def tuo_cli(settings: Settings, *args: str, input: str | None = None) -> tuple[int, str]:
    """Run the `tuo` command line against the test stack; (exit code, output)."""
    from typer.testing import CliRunner

    from runtime.cli import app

    env = {"TUO_STATE_DIR": str(settings.state_dir), "COLUMNS": "250", "TUO_LOG_LEVEL": "WARNING"}
    result = CliRunner().invoke(app, list(args), env=env, input=input)
    return result.exit_code, result.output
