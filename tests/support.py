"""Helpers shared by the tests: waiting for an outcome, reading a topic, sample events."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord, TopicPartition
from fastapi import FastAPI

from producers.office_keys import SigningKey
from runtime import kafka
from runtime.access import grant_full_access
from runtime.logging import logging_restored
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


# The tests' own Kafka user: it may read and write everything, so that tests can look
# at any topic and play a hostile client. The bus itself never uses it.
INSPECTOR = "test-inspector"


async def grant_inspector(settings: Settings) -> None:
    """Create the inspector's user and ACLs, as the operators' tooling would."""
    if settings.kafka_security_protocol.startswith("SASL_"):
        await grant_full_access(settings, INSPECTOR)


def inspector_producer(settings: Settings, **options: Any) -> AIOKafkaProducer:
    """A plain (not idempotent) producer as the inspector, for writing raw test messages."""
    return AIOKafkaProducer(**kafka.connection_options(settings, INSPECTOR), **options)


def inspector_consumer(settings: Settings, *topics: str, **options: Any) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(*topics, **kafka.connection_options(settings, INSPECTOR), **options)


def kafka_env(settings: Settings) -> dict[str, str]:
    """The TUO_KAFKA_* variables that give a child process these settings' Kafka access."""
    env = {
        "TUO_KAFKA_BOOTSTRAP_SERVERS": settings.require_bootstrap_servers(),
        "TUO_KAFKA_SECURITY_PROTOCOL": settings.kafka_security_protocol,
    }
    optional = {
        "TUO_KAFKA_SASL_MECHANISM": settings.kafka_sasl_mechanism,
        "TUO_KAFKA_SSL_CAFILE": settings.kafka_ssl_cafile,
        "TUO_KAFKA_CREDENTIALS_FILE": settings.kafka_credentials_file,
        "TUO_KAFKA_SASL_USERNAME": settings.kafka_sasl_username,
        "TUO_KAFKA_SASL_PASSWORD": settings.kafka_sasl_password.get_secret_value()
        if settings.kafka_sasl_password
        else None,
    }
    env.update({name: str(value) for name, value in optional.items() if value is not None})
    return env


def settings_from_stack(env_file: Path, **overrides: Any) -> Settings:
    """Settings from a local stack's env file, as its clients would have them."""
    values: dict[str, Any] = {
        name.removeprefix("TUO_").lower(): value
        for name, value in (line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    }
    return Settings(**{**values, **overrides})


async def read_topic(
    settings: Settings, topic: str, principal: str = INSPECTOR
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every committed message on ``topic`` right now (read_committed, from the start)."""
    consumer = AIOKafkaConsumer(
        topic,
        **kafka.connection_options(settings, principal),  # no group: every partition is assigned to us
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


# A person dies once: intake refuses a second death for the same NINO (producers/duplicates.py).
# So each death_registration() is another Pat Example, with a NINO of their own from this
# series; known_deceased() gives the tax office and the pensions service a record of each.
KNOWN_DECEASED = 5000
_deceased = itertools.count()


def deceased_nino(n: int) -> str:
    return f"AB{200000 + n % KNOWN_DECEASED:06d}C"


async def known_deceased(pool: asyncpg.Pool) -> None:
    """Tax records and pensions in payment for every NINO death_registration() gives,
    like those the demo's seed gives its deceased (so those agencies apply the death)."""
    ninos = [deceased_nino(n) for n in range(KNOWN_DECEASED)]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO agency.tax_record (nino, given_names, family_name, address_lines, town, postcode)"
            " SELECT n, 'Pat', 'Example', ARRAY['1 Example Street'], 'Leeds', 'LS1 1AA'"
            "   FROM unnest($1::text[]) n ON CONFLICT (nino) DO NOTHING",
            ninos,
        )
        await conn.execute(
            "INSERT INTO agency.pension_award (nino, weekly_amount_pence, paid_until)"
            " SELECT n, 23025, $2 FROM unnest($1::text[]) n ON CONFLICT (nino) DO NOTHING",
            ninos,
            today(),
        )


def death_registration(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "informant": {"name": "Alex Example", "relationship": "daughter"},
        "channel": "desk",
        "deceased": {
            "given_names": "Pat",
            "family_name": "Example",
            "date_of_birth": "1941-03-02",
            "nino": deceased_nino(next(_deceased)),
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

    # Ten prefixes, not one: two tests drawing the same NINO would register one death twice,
    # which intake refuses (producers/duplicates.py).
    prefix = random.choice(["CE", "CH", "JA", "JB", "JC", "JE", "JG", "JH", "JJ", "JK"])
    digits = "".join(random.choice("0123456789") for _ in range(6))
    return f"{prefix}{digits}{random.choice('ABCD')}"


TEST_OFFICE = "test-office"
# The office the web forms' test registrars work for: the session's pool fixture makes it
# (with its sealed signing key), so that making a registrar needs no data key.
WEB_FORMS_OFFICE = ("web-forms", "Leeds Register Office")


async def office_key(pool: asyncpg.Pool, settings: Settings, office: str = TEST_OFFICE) -> SigningKey:
    """The active signing key of a test registration office, created on first use."""
    from producers.accounts import ensure_office
    from producers.office_keys import active_key
    from runtime.sealing import PayloadSealer

    sealer = PayloadSealer.from_settings(settings)
    await ensure_office(pool, office, f"Test register office {office}", sealer)
    return await active_key(pool, office, sealer)


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


def tuo_cli(
    settings: Settings, *args: str, input: str | None = None, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run the `tuo` command line against the test stack (``env``: settings to override);
    (exit code, output)."""
    from typer.testing import CliRunner

    from operators.cli import app

    env = {
        "TUO_STATE_DIR": str(settings.state_dir),
        "COLUMNS": "250",
        "TUO_LOG_LEVEL": "WARNING",
        **(env or {}),
    }
    # The command configures logging for itself (at WARNING here): not for the tests after it.
    with logging_restored():
        result = CliRunner().invoke(app, list(args), env=env, input=input)
    return result.exit_code, result.output


async def known_to_every_agency(pool: asyncpg.Pool, nino: str, person: Any, partner: Any, home: Any) -> None:
    """Records for ``person`` at hmrc (tax), dwp (a pension of £210 a week), dvla (a licence)
    and council-leeds (a household at ``home`` with ``partner``)."""
    from consumers.agencies import records

    async with pool.acquire() as conn, conn.transaction():
        await records.open_tax_record(conn, nino, person, home)
        await records.award_pension(conn, nino, 21_000, today())
        await records.issue_driving_licence(conn, person, home)
        await records.register_household(
            conn, "council-leeds", home, [records.Resident(person), records.Resident(partner)]
        )


@asynccontextmanager
async def intake_in_process(
    services: Settings, pool: asyncpg.Pool
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The intake app started in this process (to look at its state), with a client."""
    from producers.intake import create_app

    app = create_app(services.model_copy(update={"session_cookie_secure": False}), pool)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://intake") as client,
    ):
        yield app, client


def accepting_processes(port: int) -> int:
    """Processes accepting connections on this TCP port: holding its listening socket and
    waiting on it in their event loop (an epoll set that holds it, per /proc/<pid>/fdinfo),
    so a process that only inherited the socket and has not started serving is not counted."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    accepting = 0
    for process in Path("/proc").glob("[0-9]*"):
        try:
            held = {fd.name for fd in (process / "fd").iterdir() if os.readlink(fd) in inodes}
            if held and any(
                re.search(rf"^tfd:\s+({'|'.join(held)})\s", info.read_text(), re.MULTILINE)
                for info in (process / "fdinfo").iterdir()
            ):
                accepting += 1
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return accepting


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue  # gone meanwhile
    return found


async def kafka_log_evidence(
    tools: Path,
    data_dir: Path,
    server_log: Path,
    locations: list[tuple[str, int, int]],
    *,
    mention: tuple[str, ...],
) -> str:
    """Kafka's own dump of the batches, transaction markers and aborted ranges near each
    (topic, partition, offset), the marker that closed the transaction holding it, and the
    broker's warnings and the log lines that ``mention`` any of some strings: which
    producer and epoch wrote a record, and which marker (COMMIT or ABORT, at which epoch)
    closed its transaction's range."""
    lines: list[str] = []
    for topic, partition, offset in locations:
        folder = data_dir / f"{topic}-{partition}"
        files = sorted(str(f) for f in folder.glob("*") if f.suffix in (".log", ".txnindex"))
        dump = await asyncio.create_subprocess_exec(
            *("java", "-cp", f"{tools}/*", "org.apache.kafka.tools.DumpLogSegments", "--deep-iteration"),
            *("--files", ",".join(files)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await dump.communicate()
        near = range(offset - 12, offset + 13)
        lines.append(f"{topic}-{partition} near offset {offset}:")
        producer = holder = None  # the producer of the batch being read; of the one holding ``offset``
        closed = False
        for line in out.decode(errors="replace").splitlines():
            batch = re.match(r"baseOffset: (\d+) lastOffset: (\d+) .*producerId: (-?\d+)", line)
            marker = re.match(r"\| offset: (\d+) .*endTxnMarker", line)
            aborted = re.search(r"firstOffset: (\d+) lastOffset: (\d+)", line)
            if batch:
                producer = batch.group(3)
                if int(batch.group(1)) <= offset <= int(batch.group(2)):
                    holder = producer
            if line.startswith("Error") or "Exception" in line:
                lines.append(line[:300])
            elif batch and int(batch.group(1)) < near.stop and int(batch.group(2)) >= near.start:
                lines.append(line[:300])
            elif marker and int(marker.group(1)) in near:
                lines.append(f"producerId {producer} {line[:300]}")
            elif marker and not closed and int(marker.group(1)) > offset and producer == holder:
                lines.append(f"the marker closing it: producerId {producer} {line[:300]}")
                closed = True
            elif aborted and int(aborted.group(1)) <= near.stop and int(aborted.group(2)) >= near.start:
                lines.append("aborted range: " + line[:300])
    if server_log.exists():
        lines += [
            line[:300]
            for line in server_log.read_text().splitlines()
            if line.startswith("[")
            and (" WARN " in line or " ERROR " in line or any(m in line for m in mention))
        ][-40:]
    return "\n".join(lines)
