"""Fixtures: a real Kafka broker and a real PostgreSQL server for the session,
and the whole bus running against them.

The local stack (Kafka from Maven Central, PostgreSQL from Debian) is started in
a fresh state directory and purged afterwards. When a Docker engine answers
and TUO_TEST_BACKEND is not "local", testcontainers' Kafka and PostgreSQL serve
instead. If neither can be had, the integration tests fail; they never skip.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from devstack import LocalStack
from devstack.demo import seed_agency_records, seed_offices
from devstack.processes import free_port
from operators.services import RunningBus, start_bus
from producers.accounts import ensure_office, issue_token
from router.seed import load_seed
from runtime.access import onboard_subscribed_agencies
from runtime.database import migrate, open_pool
from runtime.sealing import PayloadSealer, new_data_key
from runtime.settings import Settings
from schemas.validation import today_in_the_uk
from tests.support import (
    WEB_FORMS_OFFICE,
    docker_engine_reachable,
    grant_inspector,
    known_deceased,
    settings_from_stack,
    test_backend,
)

if "PYTEST_XDIST_WORKER" in os.environ:
    # An xdist worker starts with COLUMNS=80 and LINES=24 in its environment (a plain
    # pytest run here has neither). Rich reads COLUMNS once, when `tuo`'s module-level
    # consoles are made, so the CLI tests' own COLUMNS would no longer widen its tables.
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)

PROJECT = Path(__file__).resolve().parent.parent
CACHE_DIR = PROJECT / ".tuo" / "cache"
KAFKA_VERSION = Settings().kafka_version


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """scripts/test.sh runs the suite in two pytest-xdist workers (``--dist loadgroup``).
    Every test on the session's stack (the ``services`` fixture, directly or through
    ``pool``, ``bus`` …) is one group, so that stack starts once, in one worker, and
    those tests never run side by side. The tests with worlds of their own (the three
    brokers, the fault suite, the benchmarks' scratch stacks) and the pure unit tests go
    to whichever worker is free: the other one, until the group is nearly done."""
    for item in items:
        if "services" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("session-stack"))


def new_state_dir(prefix: str) -> Path:
    """A fresh stack state directory under the project (the postgres service user
    must be able to reach it, which rules out root's private /tmp/pytest-of-root)."""
    (PROJECT / ".tuo").mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=PROJECT / ".tuo"))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def services() -> Iterator[Settings]:
    """Connection settings for a real broker and database, up for the whole session."""
    if test_backend() == "docker" or (test_backend() == "auto" and docker_engine_reachable()):
        yield from _containers()
        return
    state_dir = new_state_dir("test-stack-")
    stack = LocalStack(state_dir, CACHE_DIR, KAFKA_VERSION)
    try:
        stack.up()  # raises StackError with the broker's log when it cannot start
        http_port = free_port()  # known before the bus starts: the citizens' sign-in redirects here
        settings = settings_from_stack(
            stack.env_file,
            state_dir=state_dir,
            cache_dir=CACHE_DIR,
            pseudonym_key="test-pseudonym-key-" + uuid.uuid4().hex,
            http_port=http_port,
            public_url=f"http://127.0.0.1:{http_port}",
            overdue_check_seconds=1,
            # Every test signs in from 127.0.0.1; tests/runtime/test_http_security.py proves the limit.
            sign_in_attempts_per_minute=10_000,
        )
        asyncio.run(grant_inspector(settings))
        yield settings
    finally:
        stack.purge()
        shutil.rmtree(state_dir, ignore_errors=True)


def _containers() -> Iterator[Settings]:
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer

    with (
        KafkaContainer("apache/kafka:" + KAFKA_VERSION) as kafka,
        PostgresContainer("postgres:15", driver=None) as postgres,
    ):
        yield Settings(
            data_key=new_data_key(),
            kafka_bootstrap_servers=kafka.get_bootstrap_server(),
            database_url=postgres.get_connection_url(),
            pseudonym_key="test-pseudonym-key-" + uuid.uuid4().hex,
            http_port=0,
            overdue_check_seconds=1,
        )


@pytest.fixture(scope="session")
async def pool(services: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await open_pool(services)
    await migrate(pool, services)
    await load_seed(pool)
    sealer = PayloadSealer.from_settings(services)
    await seed_offices(pool, sealer)  # leeds, bradford, online
    await ensure_office(pool, *WEB_FORMS_OFFICE, sealer)
    # The reference agencies know the demo's people, who include death_registration()'s.
    await seed_agency_records(pool, today_in_the_uk())
    await known_deceased(pool)  # each death_registration()'s own NINO
    await onboard_subscribed_agencies(services, pool, by="tests")
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def bus(services: Settings, pool: asyncpg.Pool) -> AsyncIterator[RunningBus]:
    running = await start_bus(services, pool)
    yield running
    await running.shutdown()


@pytest.fixture(scope="session")
async def registrar_token(pool: asyncpg.Pool) -> str:
    """An API token for the Leeds office, registrar role."""
    return await issue_token(pool, "leeds", "registrar", "test client")


@pytest.fixture
async def intake(bus: RunningBus, registrar_token: str) -> AsyncIterator[httpx.AsyncClient]:
    """The intake API, signed in as a Leeds registrar system."""
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{bus.http_port}",
        timeout=10,
        headers={"Authorization": f"Bearer {registrar_token}"},
    ) as client:
        yield client


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that mention ``text`` (for leak checks)."""
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True)
    return [line for line in listing.stdout.splitlines() if text in line and "ps -eo" not in line]
