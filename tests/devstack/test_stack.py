"""The local stack: real servers that keep their data across restarts, purge
cleanly, and leave no process behind; and the README's demo command."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import pytest

from devstack import LocalStack
from devstack.kafka import KafkaBroker, ensure_jars
from devstack.processes import free_port
from runtime import kafka
from runtime.access import Principal
from runtime.kafka import Topics, ensure_topics
from tests.conftest import CACHE_DIR, KAFKA_VERSION, PROJECT, new_state_dir, processes_mentioning
from tests.support import read_topic, settings_from_stack

pytestmark = pytest.mark.integration


def _env(stack: LocalStack) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stack.env_file.read_text().splitlines() if "=" in line)


async def test_stopping_and_starting_keeps_data_and_purging_wipes_it() -> None:
    state_dir = new_state_dir("persist-")
    stack = LocalStack(state_dir, CACHE_DIR, KAFKA_VERSION)
    try:
        await asyncio.to_thread(stack.up)
        env = _env(stack)
        settings = settings_from_stack(stack.env_file)
        conn = await asyncpg.connect(env["TUO_DATABASE_URL"])
        await conn.execute("CREATE TABLE kept (note text); INSERT INTO kept VALUES ('still here')")
        await conn.close()
        await ensure_topics(settings, [], principal=Principal.OPERATOR)
        decisions = Topics(settings.topic_prefix).routing_decisions
        producer = kafka.producer(settings, principal=Principal.ROUTER, client_id="test")
        await producer.start()
        await producer.send_and_wait(decisions, b"still here")
        await producer.stop()

        await asyncio.to_thread(stack.down)
        assert not stack.status().kafka_running and not stack.status().postgres_running
        assert processes_mentioning(str(state_dir)) == []
        archive = ensure_jars(CACHE_DIR, KAFKA_VERSION).parent / "classes.jsa"
        assert archive.exists(), "a broker that stopped by itself leaves its classes' archive"

        await asyncio.to_thread(stack.up)
        assert _env(stack) == env, "the same ports and credentials after a restart"
        broker = stack.status().kafka_pid
        assert broker is not None
        maps = Path(f"/proc/{broker}/maps").read_text()
        assert str(archive) in maps, "the broker started again maps the archive (class-data sharing)"
        conn = await asyncpg.connect(env["TUO_DATABASE_URL"])
        assert await conn.fetchval("SELECT note FROM kept") == "still here"
        await conn.close()
        on_topic = await read_topic(settings, decisions, principal=Principal.TRACKER)
        assert [r.value for r in on_topic] == [b"still here"], "messages and passwords survive"

        await asyncio.to_thread(stack.purge)
        assert not state_dir.exists()
        assert processes_mentioning(str(state_dir)) == []

        await asyncio.to_thread(stack.up)
        conn = await asyncpg.connect(_env(stack)["TUO_DATABASE_URL"])
        assert await conn.fetchval("SELECT to_regclass('kept')") is None, "purged data is gone"
        await conn.close()
    finally:
        await asyncio.to_thread(stack.purge)
        shutil.rmtree(state_dir, ignore_errors=True)


def test_storage_format_accepts_a_cluster_id_that_starts_with_a_dash() -> None:
    home = new_state_dir("format-")
    try:
        broker = KafkaBroker(
            libs=ensure_jars(CACHE_DIR, KAFKA_VERSION),
            home=home,
            broker_port=free_port(),
            controller_port=free_port(),
            cluster_id="-" + "A" * 21,
            super_password="not-used",
            keystore_password="not-used",
        )
        broker.write_properties()
        broker.format_storage()
        assert "cluster.id=-AAAAAAAAAAAAAAAAAAAAA" in (broker.data_dir / "meta.properties").read_text()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_demo_serves_until_ctrl_c_and_then_leaves_nothing_running() -> None:
    state_dir = new_state_dir("demo-")
    env = {
        **os.environ,
        "TUO_STATE_DIR": str(state_dir),
        "TUO_CACHE_DIR": str(CACHE_DIR),
        "TUO_HTTP_PORT": "0",
        "TUO_LOG_LEVEL": "WARNING",
        "COLUMNS": "160",
    }
    tuo = str(Path(sys.executable).parent / "tuo")
    demo = subprocess.Popen(
        [tuo, "demo"],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 180
        for line in demo.stdout:
            output.append(line)
            if "Serving until Ctrl-C" in line or time.monotonic() > deadline:
                break
        text = "".join(output)
        assert "Serving until Ctrl-C" in text, text
        assert "Submitted 3 demo events" in text, text
        for agency in ("hmrc", "dwp", "dvla", "council-leeds"):
            assert agency in text
        assert text.count("applied") >= 7, "receipts for death (4), birth (1), address change (2)"
        assert "awaiting" not in text
        # Leeds City Council is told by webhook (the reference receiver, over HTTPS): the
        # death and the move, each applied and receipted over HTTPS like the others.
        assert re.search(r"council-leeds is told by webhook, at https://127\.0\.0\.1:\d+/events", text), text
        assert "2 event(s) delivered" in text, text
        # DWP hears of moves only of the people it pays (it registered the deceased): not the mover.
        assert "not of interest" in text, text
        assert processes_mentioning(str(state_dir)), "the stack runs while the demo serves"
        # The informant's journey, with what the demo printed for it, opens the death.
        printed = r"Informant's journey: (\S+) — reference (\S+), date of birth (\d+) (\d+) (\d+)"
        found = re.search(printed, text)
        assert found, text
        journey, reference, day, month, year = found.groups()
        answer = {"reference": reference, "born-day": day, "born-month": month, "born-year": year}
        opened = httpx.post(f"{journey}/reference", data=answer, timeout=10)
        assert opened.status_code == 303 and opened.headers["location"] == "/tell-us-once/registration"

        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=90)
        assert demo.returncode == 0, rest
        assert "Local stack stopped" in rest
        assert processes_mentioning(str(state_dir)) == []
    finally:
        if demo.poll() is None:
            demo.kill()
        LocalStack(state_dir, CACHE_DIR, KAFKA_VERSION).purge()
        shutil.rmtree(state_dir, ignore_errors=True)


async def test_stack_works_from_a_directory_the_postgres_user_cannot_enter() -> None:
    """CI may clone under /root (mode 0700); PostgreSQL, run as 'postgres', must still start."""
    private = new_state_dir("private-")
    private.chmod(0o700)
    state_dir = private / "state"
    stack = LocalStack(state_dir, CACHE_DIR, KAFKA_VERSION)
    try:
        await asyncio.to_thread(stack.up)
        assert stack.status().postgres_running
        conn = await asyncpg.connect(_env(stack)["TUO_DATABASE_URL"])
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        postgres_home = Path(json.loads(stack.layout_file.read_text())["postgres_home"])
        if os.geteuid() == 0:
            assert not postgres_home.is_relative_to(private), "moved where 'postgres' can reach it"
        else:
            assert postgres_home == state_dir.resolve() / "postgres"
        await asyncio.to_thread(stack.purge)
        assert not postgres_home.exists(), "purge removes the cluster wherever it lives"
    finally:
        await asyncio.to_thread(stack.purge)
        shutil.rmtree(private, ignore_errors=True)


def test_a_stale_pid_file_naming_another_process_is_not_taken_for_the_broker() -> None:
    home = new_state_dir("stale-")
    try:
        broker = KafkaBroker(
            libs=CACHE_DIR,
            home=home,
            broker_port=free_port(),
            controller_port=free_port(),
            cluster_id="x",
            super_password="not-used",
            keystore_password="not-used",
        )
        broker.pid_file.write_text(str(os.getpid()))  # alive, but this test, not a broker
        assert broker.pid() is None
        broker.stop()  # must not signal this process
        assert not broker.pid_file.exists()
    finally:
        shutil.rmtree(home, ignore_errors=True)
