"""Intake API throughput and latency, outbox included, against a floor measured
in the same run, with a load generator that is not the bottleneck.

    .venv/bin/python -m bench.intake [--events 5000] [--concurrency 32] [--processes 1]

Starts its own local stack (Kafka + PostgreSQL in a scratch state directory;
Kafka over TLS with SASL/SCRAM, as the bus uses it) and runs `tuo run intake
relay` as a separate process, as in production. The load comes from ``wrk`` (a C
HTTP load generator, Debian package ``wrk``) driven by ``bench/intake.lua``:

  (0) the load generator's own ceiling: wrk against ``bench.trivial_http``, a
      server in its own process that only answers 200. Below ``FLOOR_NEEDED``
      requests/s the run fails: the intake figure would measure the client (a
      Python HTTP client spends milliseconds of CPU per request).
  (a) floor: GET /healthz for a few seconds — the same server, HTTP parsing and one
      PostgreSQL round trip, nothing else.
  (b) intake: N POST /v1/death-registrations with a bearer token, each a new person
      with its own Idempotency-Key — token check, validation, Avro encoding, the
      office's Ed25519 signature, and intake record + consent + outbox row in one
      transaction.

Before printing a rate it proves the work: every POST answered 201, exactly N new
intake records stored, and each of them published once on the life-events topic
(read_committed, counted by ce_id) by the relay. Otherwise it fails with the counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.arrivals import TooSlow, read_committed, require_all_arrived
from bench.scratch import deploy_bus, scratch_stack
from devstack.demo import seed_offices
from devstack.processes import free_port
from producers.accounts import issue_token
from router.seed import load_seed
from runtime.database import migrate, open_pool
from runtime.kafka import Topics
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from tests.support import accepting_processes, death_registration

SCRIPT = Path(__file__).with_name("intake.lua")
FLOOR_NEEDED = 2_000  # requests/s the load generator must reach against a server doing nothing
FLOOR_SECONDS = 5
STEADY_SECONDS = 20
THREADS = 2  # one per core of the development machine; the server shares them


class LoadGeneratorFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class WrkResult:
    """What ``bench/intake.lua`` counted: answers by kind, wrk's errors, latency."""

    created: int  # 201s: events stored
    ok: int  # 200s: /healthz answers
    refused: int  # any other status
    first_refusal: str
    requests: int
    seconds: float  # wrk's run; for POSTs, from the first sent to the last answered
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    late: int  # paced POSTs sent after their slot (every connection busy), and by how much
    late_max_ms: float

    @classmethod
    def parse(cls, output: str) -> WrkResult:
        line = next((ln for ln in output.splitlines() if ln.startswith("WRK_RESULT ")), None)
        if line is None:
            raise LoadGeneratorFailed(f"wrk printed no result:\n{output[-1500:]}")
        found = json.loads(line.removeprefix("WRK_RESULT "))
        return cls(
            created=found["created"],
            ok=found["ok"],
            refused=found["refused"],
            first_refusal=found["first_refusal"],
            requests=found["requests"],
            seconds=(found["posting_us"] or found["duration_us"]) / 1e6,
            errors=found["errors"],
            p50_ms=found["p50_us"] / 1000,
            p90_ms=found["p90_us"] / 1000,
            p99_ms=found["p99_us"] / 1000,
            max_ms=found["max_us"] / 1000,
            late=found["late"],
            late_max_ms=found["late_max_us"] / 1000,
        )

    @property
    def failed_sockets(self) -> int:
        return sum(v for k, v in self.errors.items() if k != "status")


async def wrk(
    base: str, concurrency: int, seconds: float, *script_args: str, threads_to_finish: int = 0
) -> WrkResult:
    """Run wrk with ``bench/intake.lua`` for at most ``seconds``; with
    ``threads_to_finish``, interrupt it as soon as that many threads said they were done
    (wrk itself would wait out its whole duration)."""
    if shutil.which("wrk") is None:
        raise LoadGeneratorFailed("wrk is not installed; run scripts/setup.sh (Debian package wrk)")
    command = [
        "wrk",
        f"-t{min(THREADS, concurrency)}",
        f"-c{concurrency}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "60s",  # a slow answer is a slow answer, not a lost one
        "-s",
        str(SCRIPT),
        base,
        "--",
        *script_args,
    ]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    lines: list[str] = []

    async def read() -> None:
        finished = 0
        assert process.stdout is not None
        async for raw in process.stdout:
            lines.append(raw.decode(errors="replace"))
            if lines[-1].startswith("WRK_THREAD_DONE"):
                finished += 1
                if finished == threads_to_finish and process.returncode is None:
                    process.send_signal(signal.SIGINT)  # wrk then prints its summary and exits
        await process.wait()

    try:
        await asyncio.wait_for(read(), seconds + 90)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise TooSlow("wrk", seconds + 90, "it did not stop after its duration") from None
    output = "".join(lines)
    if process.returncode != 0:
        raise LoadGeneratorFailed(f"wrk exited {process.returncode}:\n{output[-1500:]}")
    return WrkResult.parse(output)


async def post_deaths(
    base: str,
    token: str,
    events: int,
    first: int,
    concurrency: int,
    seconds: float,
    body_file: Path,
    rate: float | None = None,
) -> WrkResult:
    """POST ``events`` new deaths (NINOs numbered from ``first``), back to back or at a
    steady ``rate`` a second; fail unless each was answered, 201, within ``seconds``."""
    threads = min(THREADS, concurrency)
    result = await wrk(
        base,
        concurrency,
        seconds,
        "post",
        str(threads),
        token,
        "/v1/death-registrations",
        str(events),
        str(first),
        str(body_file),
        *(() if rate is None else (str(rate), str(concurrency))),
        threads_to_finish=threads,
    )
    if result.refused or result.failed_sockets:
        raise LoadGeneratorFailed(
            f"of {events:,} POSTs, {result.created:,} were accepted, {result.refused:,} refused"
            f" (first: {result.first_refusal!r}), socket errors {result.errors}"
        )
    if result.created != events:
        raise TooSlow("intake", seconds, f"{result.created:,} of {events:,} POSTs answered")
    return result


async def floor(base: str, concurrency: int) -> WrkResult:
    result = await wrk(base, concurrency, FLOOR_SECONDS, "floor")
    require_all_arrived(
        "floor: GET /healthz answered 200", result.requests, result.ok, f"errors {result.errors}"
    )
    return result


async def generator_ceiling(concurrency: int) -> WrkResult:
    """What the load generator sends on this machine against a server that does nothing
    (``bench.trivial_http``, its own process): it must be far above the intake figure."""
    port = free_port()
    server = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.trivial_http", str(port))
    try:
        await _await_service(f"http://127.0.0.1:{port}", path="/")
        return await floor(f"http://127.0.0.1:{port}", concurrency)
    finally:
        server.terminate()
        await server.wait()


async def _await_service(base: str, path: str = "/healthz") -> None:
    async with httpx.AsyncClient(base_url=base, timeout=5) as client:
        deadline = time.monotonic() + 60
        while True:
            try:
                if (await client.get(path)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the intake service did not start")
            await asyncio.sleep(0.2)


async def _await_listeners(port: int, processes: int, seconds: float = 60) -> None:
    """Until every intake process accepts: the first answers before the others have started."""
    deadline = time.perf_counter() + seconds
    while (found := accepting_processes(port)) < processes:
        if time.perf_counter() > deadline:
            raise LoadGeneratorFailed(f"{found} of {processes} intake processes accept after {seconds:.0f} s")
        await asyncio.sleep(0.2)


async def measure(
    settings: Settings,
    env: dict[str, str],
    events: int,
    concurrency: int,
    seconds: float = 600,
    rates: tuple[float, ...] = (),
) -> dict[str, Any]:
    ceiling = await generator_ceiling(concurrency)  # before the bus starts: nothing else runs
    ceiling_per_s = ceiling.ok / ceiling.seconds
    pool = await open_pool(settings)
    server: asyncio.subprocess.Process | None = None
    scratch = Path(tempfile.mkdtemp(prefix="tuo-intake-bench-"))
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
        await _await_service(base)
        await _await_listeners(int(env["TUO_HTTP_PORT"]), int(env.get("TUO_INTAKE_PROCESSES", "1")))
        body_file = scratch / "death.json"
        body_file.write_text(json.dumps(death_registration(deceased={**_person(), "nino": "__NINO__"})))

        warm = min(500, max(events // 5, 1))
        await post_deaths(base, token, warm, 0, concurrency, seconds, body_file)
        floored = await floor(base, concurrency)
        floor_per_s = floored.ok / floored.seconds
        before = {r["event_id"] for r in await pool.fetch("SELECT event_id FROM intake_record")}
        posted = await post_deaths(base, token, events, warm, concurrency, seconds, body_file)
        accepted_per_s = posted.created / posted.seconds

        stored = {r["event_id"] for r in await pool.fetch("SELECT event_id FROM intake_record")} - before
        require_all_arrived("intake: events stored (new intake records)", posted.created, len(stored))
        steady: list[tuple[float, WrkResult]] = []
        every = set(stored)
        first = warm + events
        for rate in rates:
            count = max(1, round(rate * STEADY_SECONDS))
            known = {r["event_id"] for r in await pool.fetch("SELECT event_id FROM intake_record")}
            paced = await post_deaths(base, token, count, first, concurrency, seconds, body_file, rate=rate)
            first += count
            new = {r["event_id"] for r in await pool.fetch("SELECT event_id FROM intake_record")} - known
            require_all_arrived(f"intake at {rate:g}/s: events stored", paced.created, len(new))
            every |= new
            steady.append((rate, paced))
        started = time.perf_counter()
        while unpublished := await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"):
            if time.perf_counter() - started > 120:
                raise TooSlow("the relay", 120, f"{unpublished:,} outbox rows unpublished")
            await asyncio.sleep(0.05)
        drained = time.perf_counter() - started
        life_events = Topics(settings.topic_prefix).life_events
        on_topic = (await read_committed(settings, [life_events]))[life_events].ids
        published = sum(on_topic[str(event_id)] == 1 for event_id in every)
        require_all_arrived("intake: stored events published once on life-events", len(every), published)
    finally:
        if server is not None and server.returncode is None:
            server.terminate()
            await server.wait()
        await pool.close()
        shutil.rmtree(scratch, ignore_errors=True)

    processes = int(env.get("TUO_INTAKE_PROCESSES", "1"))
    print(
        f"{events:,} requests, {concurrency} connections from wrk ({THREADS} threads), one 2-core machine;"
        f" intake in {processes} process{'es' if processes > 1 else ''}"
    )
    print(
        f"  floor: GET /healthz (HTTP + 1 DB round trip), {FLOOR_SECONDS} s:"
        f" {floor_per_s:>8,.0f} req/s   p50 {floored.p50_ms:6.1f} ms   p99 {floored.p99_ms:6.1f} ms"
    )
    print(
        f"  intake: POST /v1/death-registrations:        {accepted_per_s:>8,.0f} req/s"
        f"   p50 {posted.p50_ms:6.1f} ms   p99 {posted.p99_ms:6.1f} ms"
    )
    print(f"  ratio intake / floor: {accepted_per_s / floor_per_s:.2f}")
    for rate, paced in steady:
        print(
            f"  at a steady {rate:,.0f}/s for {STEADY_SECONDS} s ({paced.created:,} POSTs,"
            f" {paced.created / paced.seconds:,.0f}/s): p50 {paced.p50_ms:6.1f} ms"
            f"   p99 {paced.p99_ms:6.1f} ms; sent after their slot {paced.late}"
            f" (by {paced.late_max_ms:,.0f} ms at most)"
        )
    print(
        f"  the load generator itself, against a server that only answers 200 (bench.trivial_http):"
        f" {ceiling_per_s:,.0f} req/s"
    )
    print(
        f"  {len(every):,} events stored with their outbox rows and published once each; the relay had"
        f" published all of them {drained:.2f} s after the last was accepted"
    )
    if ceiling_per_s < FLOOR_NEEDED:
        raise LoadGeneratorFailed(
            f"the load generator managed only {ceiling_per_s:,.0f} requests/s against a server that does"
            f" nothing (needed: {FLOOR_NEEDED:,}): the intake figure would measure the client"
        )
    return {
        "requests": events,
        "concurrency": concurrency,
        "intake_processes": processes,
        "load_generator": f"wrk, {THREADS} threads",
        "sent": events,
        "arrived": published,
        "stored": len(stored),
        "accepted_per_s": round(accepted_per_s, 1),
        "p50_ms": round(posted.p50_ms, 1),
        "p90_ms": round(posted.p90_ms, 1),
        "p99_ms": round(posted.p99_ms, 1),
        "floor_per_s": round(floor_per_s, 1),
        "load_generator_per_s": round(ceiling_per_s, 1),
        "floor_requests": floored.ok,
        "floor_p50_ms": round(floored.p50_ms, 2),
        "floor_p99_ms": round(floored.p99_ms, 2),
        "ratio": round(accepted_per_s / floor_per_s, 3),
        "relay_published_all_after_s": round(drained, 2),
        "steady": [
            {
                "rate": rate,
                "posts": paced.created,
                "p50_ms": round(paced.p50_ms, 1),
                "p99_ms": round(paced.p99_ms, 1),
            }
            for rate, paced in steady
        ],
    }


def _person() -> dict[str, str]:
    return {"given_names": "Pat", "family_name": "Example", "date_of_birth": "1941-03-02"}


def main(events: int, concurrency: int, processes: int = 1, rates: tuple[float, ...] = ()) -> dict[str, Any]:
    with scratch_stack() as stack:
        env = {**stack.service_env("bench", free_port()), "TUO_INTAKE_PROCESSES": str(processes)}
        settings = stack.settings("bench")
        return asyncio.run(measure(settings, env, events, concurrency, rates=rates))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--processes", type=int, default=1, help="intake processes `tuo run` runs (TUO_INTAKE_PROCESSES)"
    )
    parser.add_argument(
        "--steady",
        default="100,300",
        help="rates (POSTs a second, comma-separated) each held for a while after the throughput run,"
        " to see answer times at a steady load; '' for none",
    )
    args = parser.parse_args()
    main(args.events, args.concurrency, args.processes, tuple(float(r) for r in args.steady.split(",") if r))
