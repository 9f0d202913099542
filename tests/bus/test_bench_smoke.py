"""The benchmarks cannot print a figure for work they did not do.

Each benchmark this file covers runs at a tiny size (`python -m bench --smoke`, a
few hundred events, its own scratch stack), as an operator runs it. Nothing is
timed: the tests assert the counts (what was sent arrived at the far end) and that
results.json keeps every key the README's table is built from. A replay fixture
broken on purpose (unsigned rows, which replay must refuse to send) has to fail
the run with the counts and print no rate.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import RECORDED, SMOKE
from bench.proof import TimeLimitExceeded, WorkNotDone, prove, prove_figures, time_limit

PROJECT = Path(__file__).resolve().parents[2]


def bench(out: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    """`python -m bench --smoke --out OUT ARGS`, as an operator runs it (PYTHONPATH passed on)."""
    return subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out), *args],
        cwd=PROJECT,
        env={**os.environ, "TUO_LOG_LEVEL": "WARNING"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def recorded(out: Path, name: str) -> dict[str, Any]:
    results = json.loads((out / "results.json").read_text())
    assert results["commit"] and results["machine"]["cpus"]
    figures: dict[str, Any] = results["benchmarks"][name]
    return figures


def assert_every_key(figures: dict[str, Any]) -> None:
    missing = [key for key in RECORDED if key not in figures]
    assert not missing, f"results.json lacks {missing}"
    assert figures["machine"]["cores"] >= 1 and len(figures["machine"]["load_average_before"]) == 3
    assert figures["commit"] != "unknown"
    assert figures["cpu"]["processes"], "no process's CPU was measured"


@pytest.mark.integration
def test_replay_sends_every_stored_signed_event(tmp_path: Path) -> None:
    run = bench(tmp_path, "--only", "replay")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = recorded(tmp_path, "replay")
    events = SMOKE["replay"]["events"]
    assert figures["sent"] == figures["arrived"] == events
    assert figures["replay_tally"] == {"sent": events, "examined": events, "withheld": {}}
    assert figures["bare"]["arrived"] == events
    assert_every_key(figures)
    assert set(figures["stages"]) == {
        "replay batch (read, open, decide, splice, send, record)",
        "bare pipe batch (read, send)",
    }
    # Consent withdrawn mid-replay: every consented event arrived, none of those who withdrew.
    withdrawal = figures["withdrawal_mid_replay"]
    assert withdrawal["withdrawn"] > 0 and withdrawal["consented"] == events // 2
    assert withdrawal["sent"] == withdrawal["arrived"] == withdrawal["consented"] - withdrawal["withdrawn"]
    assert withdrawal["withdrawal_confirmed_after_events"] < events * 4 // 5
    # Its own process signs, replays and reads the topic; the broker and PostgreSQL serve it.
    processes = figures["cpu"]["processes"]
    assert {"kafka broker (java)", "postgresql"} <= set(processes), processes
    assert "events/s" in (tmp_path / "results.md").read_text()


@pytest.mark.integration
def test_unsigned_replay_rows_fail_the_run_with_the_counts_and_no_rate(tmp_path: Path) -> None:
    run = bench(tmp_path, "--only", "replay", "--replay-fixture", "unsigned")
    events = SMOKE["replay"]["events"]
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"replay: sent {events}, arrived 0" in run.stderr
    assert "withheld {'UNROUTABLE': " + str(events) + "}" in run.stderr  # why: not one verified
    assert "replay to dwp" not in run.stdout  # the replay's rate line
    figures = recorded(tmp_path, "replay")
    assert (figures["sent"], figures["arrived"]) == (events, 0)
    assert "replay_per_s" not in figures and "bare_per_s" not in figures
    assert_every_key(figures)
    table = (tmp_path / "results.md").read_text()
    replay_row = next(line for line in table.splitlines() if line.startswith("| replay"))
    assert "failed: replay: sent 300, arrived 0" in replay_row and "events/s" not in replay_row


@pytest.mark.integration
def test_agencies_receipt_every_event_in_both_parts(tmp_path: Path) -> None:
    run = bench(tmp_path, "--only", "agencies")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = recorded(tmp_path, "agencies")
    size = SMOKE["agencies"]
    events = size["events"] + round(size["rate"] * size["seconds"])
    assert figures["sent"] == figures["arrived"] == events
    throughput, latency = figures["throughput"], figures["latency"]
    assert throughput["sent"] == throughput["arrived"] == size["events"]
    assert throughput["bare"] == {"sent": size["events"], "arrived": size["events"]}
    assert latency["sent"] == latency["arrived"] == round(size["rate"] * size["seconds"])
    assert_every_key(figures)
    stages = figures["stages"]
    for stage in ("published", "decided", "received", "stored"):
        cuts = stages[f"latency: intake → {stage}"]
        assert cuts["count"] >= latency["sent"] and {"p50_ms", "p95_ms", "p99_ms"} <= set(cuts)
    assert "tuo run" in " ".join(figures["cpu"]["processes"])  # the bus's own process, measured


@pytest.mark.integration
def test_webhooks_deliver_every_event_both_ways(tmp_path: Path) -> None:
    run = bench(tmp_path, "--only", "webhooks")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = recorded(tmp_path, "webhooks")
    events = SMOKE["webhooks"]["events"]
    assert figures["sent"] == figures["arrived"] == events
    assert figures["bare"] == {"sent": events, "arrived": events}
    assert figures["attempts"] >= events
    assert_every_key(figures)
    assert "webhook bridge" in (tmp_path / "results.md").read_text()


# The checks themselves, without a stack.


def test_a_benchmark_that_reports_no_counts_has_proven_nothing() -> None:
    with pytest.raises(WorkNotDone, match="did not report its sent and arrived counts"):
        prove_figures("router", {"router_per_s": 9_999.0})


@pytest.mark.parametrize(
    ("sent", "arrived"), [(300, 0), (300, 299), (0, 0), (300, 301), (300, "300"), (True, True)]
)
def test_counts_that_differ_or_are_not_counts_fail_with_both(sent: Any, arrived: Any) -> None:
    with pytest.raises(WorkNotDone) as failure:
        prove("replay", sent, arrived)
    assert f"sent {sent}, arrived {arrived}" in str(failure.value)


def test_a_part_that_lost_events_fails_the_whole_benchmark() -> None:
    figures = {"sent": 200, "arrived": 200, "latency": {"sent": 100, "arrived": 100}}
    figures["throughput"] = {"sent": 100, "arrived": 99}
    with pytest.raises(WorkNotDone, match=r"agencies\.throughput: sent 100, arrived 99"):
        prove_figures("agencies", figures)


def test_a_benchmark_past_its_time_limit_fails_saying_so() -> None:
    started = time.monotonic()
    with pytest.raises(TimeLimitExceeded, match="replay: still running after its time limit of 1 s"):
        with time_limit(1, "replay"):
            time.sleep(30)
    assert time.monotonic() - started < 5


def test_a_benchmark_stuck_in_its_event_loop_is_stopped_at_its_time_limit() -> None:
    """As a benchmark waits on a task that never finishes (a hung worker, a lost reply)."""
    cleaned_up = []

    async def stuck() -> None:
        try:
            await asyncio.create_task(asyncio.sleep(3600))
        finally:
            cleaned_up.append(True)  # its `finally` (the scratch stack's purge) still runs

    with pytest.raises(TimeLimitExceeded, match="router: still running after its time limit of 1 s"):
        with time_limit(1, "router"):
            asyncio.run(stuck())
    assert cleaned_up == [True]
