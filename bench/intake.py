"""Intake API throughput and latency, outbox included, against a floor measured
in the same run.

    .venv/bin/python -m bench.intake [--events 5000] [--concurrency 32]

Starts its own local stack (Kafka + PostgreSQL in a scratch state directory;
Kafka over TLS with SASL/SCRAM, as the bus uses it) and runs `tuo run intake
relay` as a separate process, as in production. A load generator in this
process then:

  (a) floor: GET /healthz — the same server, HTTP parsing and one PostgreSQL
      round trip, nothing else;
  (b) intake: POST /v1/death-registrations with a bearer token, each a new
      person — token check, validation, Avro encoding, the office's Ed25519
      signature, and intake record + consent + outbox row in one transaction.

Prints requests/s and latency p50/p99 for both, the ratio, and how long the
relay took to publish every accepted event to Kafka.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.scratch import deploy_bus, scratch_stack
from producers.accounts import issue_token
from router.seed import load_seed
from runtime.database import migrate, open_pool
from runtime.demo import seed_offices
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from tests.support import death_registration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _load(
    client: httpx.AsyncClient, count: int, concurrency: int, request: Callable[[], Any]
) -> tuple[float, list[float]]:
    """Send ``count`` requests from ``concurrency`` workers; (wall seconds, latencies)."""
    latencies: list[float] = []
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            response = await request()
            latencies.append(time.perf_counter() - started)
            if response.status_code not in (200, 201):
                raise RuntimeError(f"refused: {response.status_code} {response.text[:300]}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def _report(name: str, wall: float, latencies: list[float]) -> tuple[float, float, float]:
    """Print and return (requests/s, p50 ms, p99 ms)."""
    rate = len(latencies) / wall
    cuts = statistics.quantiles(latencies, n=100)
    print(f"  {name:<42} {rate:>8,.0f} req/s   p50 {cuts[49] * 1000:6.1f} ms   p99 {cuts[98] * 1000:6.1f} ms")
    return rate, cuts[49] * 1000, cuts[98] * 1000


async def measure(settings: Settings, env: dict[str, str], events: int, concurrency: int) -> dict[str, Any]:
    pool = await open_pool(settings)
    server: asyncio.subprocess.Process | None = None
    try:
        await migrate(pool, settings)
        await load_seed(pool)
        await seed_offices(pool, PayloadSealer.from_settings(settings))
        await deploy_bus(settings, pool)  # the relay's ACLs for the bench's topics
        token = await issue_token(pool, "leeds", "registrar", "benchmark")
        server = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "tuo"), "run", "intake", "relay", env=env
        )
        base = f"http://127.0.0.1:{env['TUO_HTTP_PORT']}"
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(
            base_url=base, timeout=30, limits=limits, headers={"Authorization": f"Bearer {token}"}
        ) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the intake service did not start")
                await asyncio.sleep(0.2)
            # Every death another person: intake refuses the same NINO's death twice.
            ninos = (f"CE{n % 1_000_000:06d}{'ABCD'[n // 1_000_000 % 4]}" for n in itertools.count())
            bodies = [death_registration(deceased={**_person(), "nino": next(ninos)}) for _ in range(events)]
            warm = min(500, events // 5)
            await _load(client, warm, concurrency, lambda: client.get("/healthz"))
            await _load(
                client, warm, concurrency, lambda: client.post("/v1/death-registrations", json=bodies.pop())
            )
            print(f"{events} requests each, {concurrency} concurrent clients, one 2-core machine")
            floor, _, _ = _report(
                "floor: GET /healthz (HTTP + 1 DB round trip)",
                *await _load(client, events, concurrency, lambda: client.get("/healthz")),
            )
            accepted_before = await pool.fetchval("SELECT count(*) FROM intake_record")
            bodies = [death_registration(deceased={**_person(), "nino": next(ninos)}) for _ in range(events)]
            wall, latencies = await _load(
                client, events, concurrency, lambda: client.post("/v1/death-registrations", json=bodies.pop())
            )
            intake, p50, p99 = _report("intake: POST /v1/death-registrations", wall, latencies)
            print(f"  ratio intake / floor: {intake / floor:.2f}")
            accepted = await pool.fetchval("SELECT count(*) FROM intake_record") - accepted_before
            started = time.perf_counter()
            while await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"):
                if time.perf_counter() - started > 120:
                    raise RuntimeError("the relay did not publish every accepted event within 120 s")
                await asyncio.sleep(0.05)
            drained = time.perf_counter() - started
            print(
                f"  {accepted} events accepted and stored with their outbox rows; the relay had published"
                f" all of them {drained:.2f} s after the last was accepted"
            )
            return {
                "requests": events,
                "concurrency": concurrency,
                "accepted_per_s": round(intake, 1),
                "p50_ms": round(p50, 1),
                "p99_ms": round(p99, 1),
                "floor_per_s": round(floor, 1),
                "ratio": round(intake / floor, 3),
                "relay_published_all_after_s": round(drained, 2),
            }
    finally:
        if server is not None and server.returncode is None:
            server.terminate()
            await server.wait()
        await pool.close()


def _person() -> dict[str, str]:
    return {"given_names": "Pat", "family_name": "Example", "date_of_birth": "1941-03-02"}


def main(events: int, concurrency: int) -> dict[str, Any]:
    with scratch_stack() as stack:
        env = stack.service_env("bench", _free_port())
        settings = stack.settings("bench")
        return asyncio.run(measure(settings, env, events, concurrency))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    main(args.events, args.concurrency)
