"""`tuo run intake` with TUO_INTAKE_PROCESSES: several intake processes accepting on
one listening socket, each taking its share of the registrations; one that dies is
started again while the others go on, and Ctrl-C stops them all."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from devstack.processes import free_port
from producers.accounts import issue_token
from runtime.settings import Settings
from tests.support import (
    accepting_processes,
    child_pids,
    death_registration,
    eventually,
    kafka_env,
    random_nino,
)

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parents[2]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _start_intake(settings: Settings, port: int, log: Path) -> subprocess.Popen[bytes]:
    assert settings.database_url and settings.pseudonym_key and settings.data_key
    env = {
        **os.environ,
        **kafka_env(settings),
        "TUO_DATABASE_URL": settings.database_url.get_secret_value(),
        "TUO_PSEUDONYM_KEY": settings.pseudonym_key.get_secret_value(),
        "TUO_DATA_KEY": settings.data_key.get_secret_value(),
        "TUO_TOPIC_PREFIX": settings.topic_prefix,
        "TUO_STATE_DIR": str(log.parent / "no-stack"),
        "TUO_HTTP_PORT": str(port),
        "TUO_INTAKE_PROCESSES": "2",
        "TUO_LOG_LEVEL": "INFO",
    }
    tuo = str(Path(sys.executable).parent / "tuo")
    return subprocess.Popen(
        [tuo, "run", "intake"], cwd=PROJECT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT
    )


async def _register(base: str, token: str, count: int) -> list[int]:
    """``count`` registrations, each on a new connection (taken by whichever process accepts first)."""

    async def one() -> int:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            response = await client.post(
                "/v1/death-registrations",
                json=death_registration(
                    deceased={"given_names": "Kit", "family_name": "Two", "nino": random_nino()}
                ),
                headers={"Authorization": f"Bearer {token}", "Idempotency-Key": uuid.uuid4().hex},
            )
            return response.status_code

    statuses: list[int] = []
    for _ in range(0, count, 10):
        statuses += await asyncio.gather(*(one() for _ in range(10)))
    return statuses


async def test_tuo_run_serves_intake_from_two_processes_on_one_socket_and_restarts_one_killed(
    services: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    token = await issue_token(pool, "leeds", "registrar", f"two processes {uuid.uuid4().hex[:8]}")
    parent = _start_intake(services, port, tmp_path / "bus.log")
    started = [parent]  # every `tuo run` this test starts, stopped at the end whatever happens
    try:

        async def two_accepting() -> bool:
            return accepting_processes(port) == 2

        await eventually(two_accepting, timeout=60, what="two intake processes accepting on the port")
        intruder = _start_intake(services, port, tmp_path / "second.log")
        started.append(intruder)
        assert await asyncio.to_thread(intruder.wait, 60) != 0, (
            "a second bus on the port must fail, not share it"
        )
        assert b"could not listen on port" in (tmp_path / "second.log").read_bytes()
        [child] = child_pids(parent.pid)
        before = _cpu_seconds(child), _cpu_seconds(parent.pid)
        assert await _register(base, token, 120) == [201] * 120
        worked = _cpu_seconds(child) - before[0], _cpu_seconds(parent.pid) - before[1]
        assert min(worked) >= 0.1, f"CPU seconds spent on 120 registrations (child, parent): {worked}"

        os.kill(child, signal.SIGKILL)
        assert await _register(base, token, 20) == [201] * 20, "the other process goes on alone"

        async def restarted() -> list[int] | None:
            found = [pid for pid in child_pids(parent.pid) if pid != child]
            return found if found and accepting_processes(port) == 2 else None

        [again] = await eventually(restarted, timeout=60, what="`tuo run` to start the intake child again")
        assert await _register(base, token, 20) == [201] * 20

        parent.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(parent.wait, 60) == 0
        assert not Path(f"/proc/{again}").exists(), "the intake child outlived `tuo run`"
        assert accepting_processes(port) == 0, "the port is free again"
        second = _start_intake(services, port, tmp_path / "bus.log")  # proof: it can be taken again
        started.append(second)
        await eventually(two_accepting, timeout=60, what="a new `tuo run` on the freed port")
        second.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(second.wait, 60) == 0
    finally:
        for process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                await asyncio.to_thread(process.wait, 30)
