"""The router, intake, codec and ProducerPerformance benchmarks prove their work before
they print a rate: a run whose far end did not get exactly what was sent fails with
both counts, and prints no figure."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bench import router as router_bench
from bench.arrivals import NotAllArrived, TooSlow, TopicTally
from bench.intake import (
    LoadGeneratorFailed,
    WrkResult,
    _await_service,
    generator_ceiling,
    post_deaths,
)
from bench.producer_performance import ProducerPerformanceFailed, parse_summary
from bench.scratch import BENCH_USER
from devstack.processes import free_port
from runtime.access import grant_full_access
from runtime.settings import Settings
from tests.support import death_message

AGENCIES = ["dwp", "hmrc", "council-bradford"]
ENTITLED = {"dwp": "t.dwp", "hmrc": "t.hmrc"}
WITHHELD = {"council-bradford": "t.council-bradford"}


def _tallies(
    events: list[str], *, drop: tuple[str, str] | None = None, extra: str | None = None
) -> dict[str, Any]:
    """What a router's output topics would hold for ``events``: each entitled agency one
    copy, one decision per agency; ``drop`` (event, topic) loses one, ``extra`` adds one."""
    tallies = {topic: TopicTally() for topic in [*ENTITLED.values(), *WITHHELD.values(), "t.decisions"]}
    for event in events:
        for topic in ENTITLED.values():
            if drop != (event, topic):
                tallies[topic].ids[event] += 1
        for agency in AGENCIES:
            tallies["t.decisions"].ids[f"{event}/{agency}"] += 1
    if extra is not None:
        tallies[extra].ids[events[0]] += 1
    for tally in tallies.values():
        tally.messages = sum(tally.ids.values())
    return tallies


def _check(tallies: dict[str, TopicTally], events: list[str]) -> int:
    return router_bench.check_routed("router", tallies, events, ENTITLED, WITHHELD, "t.decisions", AGENCIES)


def test_a_complete_routing_counts_every_event() -> None:
    events = [f"e{n}" for n in range(5)]
    assert _check(_tallies(events), events) == 5


def test_a_lost_copy_fails_the_run_with_the_counts() -> None:
    events = [f"e{n}" for n in range(5)]
    with pytest.raises(NotAllArrived) as failed:
        _check(_tallies(events, drop=("e3", "t.hmrc")), events)
    assert (failed.value.sent, failed.value.arrived) == (5, 4)
    assert "hmrc 4 of 5" in str(failed.value)
    assert "no rate recorded" in str(failed.value)


def test_a_duplicate_or_a_copy_to_an_agency_not_entitled_fails_the_run() -> None:
    events = [f"e{n}" for n in range(5)]
    with pytest.raises(NotAllArrived, match=r"dwp 4 of 5.*\+1 messages beyond"):
        _check(_tallies(events, extra="t.dwp"), events)
    with pytest.raises(NotAllArrived, match=r"council-bradford \(not entitled\) 1"):
        _check(_tallies(events, extra="t.council-bradford"), events)


def test_a_run_that_routed_nothing_fails() -> None:
    events = [f"e{n}" for n in range(3)]
    empty = {topic: TopicTally() for topic in [*ENTITLED.values(), *WITHHELD.values(), "t.decisions"]}
    with pytest.raises(NotAllArrived, match="sent 3, arrived 0"):
        _check(empty, events)


PERF_OUTPUT = """\
24531 records sent, 4906.2 records/sec (6.62 MB/sec), 2870.4 ms avg latency, 4321.0 ms max latency.
50000 records sent, 13387.4 records/sec (18.06 MB/sec), 1613.38 ms avg latency, 4321.00 ms max latency, \
1498 ms 50th, 3377 ms 95th, 4016 ms 99th, 4282 ms 99.9th.
"""


def test_producer_performance_summary_is_read_from_its_last_line() -> None:
    figures = parse_summary(PERF_OUTPUT)
    assert figures["records"] == 50000
    assert figures["per_s"] == 13387.4
    assert figures["mb_per_s"] == 18.06
    assert (figures["p50_ms"], figures["p99_ms"]) == (1498, 4016)


def test_producer_performance_without_a_summary_fails() -> None:
    with pytest.raises(ProducerPerformanceFailed, match="no summary line"):
        parse_summary(
            "Exception in thread main: org.apache.kafka.common.errors.SaslAuthenticationException\n"
        )


def test_wrk_output_without_a_result_fails() -> None:
    with pytest.raises(Exception, match="wrk printed no result"):
        WrkResult.parse("unable to connect to 127.0.0.1:1 Connection refused\n")


@pytest.fixture
async def do_nothing_server() -> AsyncIterator[str]:
    """``bench.trivial_http``: answers every request 200 and stores nothing."""
    port = free_port()
    server = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.trivial_http", str(port))
    base = f"http://127.0.0.1:{port}"
    try:
        await _await_service(base, path="/")
        yield base
    finally:
        server.terminate()
        await server.wait()


async def test_a_load_that_stores_nothing_fails_with_the_counts(
    do_nothing_server: str, tmp_path: Path
) -> None:
    # Every POST is answered 200, none 201 (created): the intake benchmark must not call
    # that a rate. It stops at its time limit and says how many were accepted.
    body = tmp_path / "death.json"
    body.write_text(json.dumps({"deceased": {"nino": "__NINO__"}}))
    with pytest.raises(TooSlow, match="0 of 40 POSTs answered"):
        await post_deaths(do_nothing_server, "token", 40, 0, 4, 2, body)


@pytest.fixture
async def refusing_server() -> AsyncIterator[str]:
    """Answers every request 422, as intake answers a body it cannot accept."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readline():
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 422 Unprocessable Content\r\nContent-Length: 7\r\n\r\nrefused")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.close()


async def test_refused_posts_fail_the_run_with_the_counts(refusing_server: str, tmp_path: Path) -> None:
    body = tmp_path / "death.json"
    body.write_text(json.dumps({"deceased": {"nino": "__NINO__"}}))
    with pytest.raises(
        LoadGeneratorFailed, match=r"of 40 POSTs, 0 were accepted, 4[01] refused \(first: '422 refused'\)"
    ):
        await post_deaths(refusing_server, "token", 40, 0, 4, 30, body)


async def test_the_load_generator_is_not_the_limit() -> None:
    ceiling = await generator_ceiling(8)
    assert ceiling.ok == ceiling.requests > 0
    assert ceiling.ok / ceiling.seconds >= 2_000, "the load generator cannot reach 2,000 requests/s here"


@pytest.fixture
async def bench_settings(services: Settings, pool: asyncpg.Pool) -> Settings:
    """The session's stack under a topic prefix of its own, with the benchmarks' client."""
    await grant_full_access(services, BENCH_USER)
    return services.model_copy(update={"topic_prefix": f"bench{uuid.uuid4().hex[:8]}"})


async def test_router_benchmark_with_unsigned_events_fails_with_the_counts(
    bench_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A deliberately broken fixture: events whose signature is missing. The router
    # dead-letters every one, so nothing reaches an agency, and the benchmark must say
    # so with the counts instead of printing a rate.
    def unsigned(subject_id: str, nino: str | None = None, *, key: Any) -> tuple[str, bytes, list[Any]]:
        event_id, value, headers = death_message(subject_id, nino, key=key)
        return event_id, value, [(k, v) for k, v in headers if not k.startswith("tuo_sig")]

    monkeypatch.setattr(router_bench, "death_message", unsigned)
    with pytest.raises(NotAllArrived) as failed:
        await router_bench.measure(bench_settings, 20, seconds=120)
    assert (failed.value.sent, failed.value.arrived) == (20, 0)
    assert "dead letters 20" in str(failed.value)
    assert "events/s" not in capsys.readouterr().out


async def test_router_benchmark_proves_every_delivery(
    bench_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = await router_bench.measure(bench_settings, 20, seconds=120, perf_min_records=2_000)
    assert figures["sent"] == figures["arrived"] == 20
    assert figures["bare"]["sent"] == figures["bare"]["arrived"] == 20
    # The bare pipe moved the router's bytes: same payloads and headers, each event's own ids.
    assert figures["bare"]["bytes"] == pytest.approx(figures["router_bytes"], rel=0.02)
    limit = figures["producer_performance"]
    assert limit["sent"] == limit["arrived"] == 2_000
    assert limit["record_size"] == figures["record_bytes_mean"] > 500
    entitled = ["dvla", "dwp", "hmpo", "hmrc", "council-leeds", "ons"]
    assert Counter(figures["entitled_agencies"]) == Counter(entitled)
    assert "events/s" in capsys.readouterr().out


@pytest.mark.parametrize(
    "hostile",
    [
        b"GET / HTTP/1.1\r\nContent-Length: banana\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 500 + b"\r\n",
        b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort",
    ],
    ids=["bad-length", "negative-length", "too-many-headers", "oversized-line", "truncated-body"],
)
async def test_the_do_nothing_server_hangs_up_on_nonsense_and_keeps_serving(
    do_nothing_server: str, hostile: bytes
) -> None:
    host, port = do_nothing_server.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(hostile)
    if hostile.endswith(b"short"):
        writer.write_eof()  # the body never comes
    try:
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        answer = b""  # closed with our bytes unread: the kernel resets, a hang-up too
    assert b"200 OK" not in answer  # no answer to nonsense: the connection is closed
    writer.close()
    # ... and the next client is served as before.
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    assert (await asyncio.wait_for(reader.readuntil(b"ok"), 10)).startswith(b"HTTP/1.1 200 OK")
    writer.close()
