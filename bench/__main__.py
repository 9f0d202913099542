"""Every benchmark in the project, one after another, into one JSON file and one table.

    .venv/bin/python -m bench [--quick | --smoke] [--out bench/results] [--only NAME ...]

Each benchmark starts its own scratch stack (Kafka over TLS with SASL/SCRAM and
PostgreSQL, as the bus runs them), measures, prints what it measures, and stops
it again. Each compares itself with a baseline measured in the same run on the
same machine: the bare fastavro codec, a bare aiokafka pipe, a bare HTTP round
trip. At the end this writes ``results.json`` (every figure) and ``results.md``
(the table the README shows) into ``--out``, and prints the table.

No figure without proof: every benchmark returns, besides its figures, ``sent``
(what it put in) and ``arrived`` (what it counted at the far end: events stored,
messages on a topic by ``ce_id`` under read_committed, receipts stored). Unless
they are the same positive count, the benchmark is recorded as failed, with the
counts and no rate, and the run exits non-zero. Each benchmark runs under a time
limit and fails with a clear message when it passes it (and if it cannot even
unwind, every thread's stack is printed and the process exits). ``results.json``
keeps for each: the counts, its stages' p50/p95/p99 (``stages``, where it has
stages), the CPU each process used (``cpu``), the machine with the load average
before it ran (``machine``), and the git commit (``commit``).

The full run stores and replays 1,000,000 events, each signed for itself (about
20 minutes in all on the 2-core development machine, more when it is busy);
``--quick`` uses smaller sizes (about 4 minutes);
``--smoke`` tiny ones, to prove the benchmarks work (tests/bus/test_bench_smoke.py), not to measure.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import agencies, codec, intake, replay, router, webhooks
from bench.proof import (
    CpuMeter,
    TimeLimitExceeded,
    WorkNotDone,
    git_commit,
    machine,
    prove_figures,
    time_limit,
)
from runtime.settings import Settings

FULL: dict[str, dict[str, Any]] = {
    "codec": {"records": 50_000, "rounds": 5},
    "intake": {"events": 5_000, "concurrency": 32},
    "router": {"events": 20_000},
    "agencies": {"events": 5_000, "rate": 100.0, "seconds": 60.0, "warm_up": 20.0},
    "replay": {"events": 1_000_000},
    "webhooks": {"events": 2_000, "in_flight": 8},
}
QUICK: dict[str, dict[str, Any]] = {
    "codec": {"records": 10_000, "rounds": 3},
    "intake": {"events": 1_000, "concurrency": 32},
    "router": {"events": 5_000},
    "agencies": {"events": 1_000, "rate": 20.0, "seconds": 30.0, "warm_up": 10.0},
    "replay": {"events": 100_000},
    "webhooks": {"events": 500, "in_flight": 8},
}
# A few hundred events at most: proves each benchmark does its work, measures nothing.
SMOKE: dict[str, dict[str, Any]] = {
    "codec": {"records": 300, "rounds": 1},
    "intake": {"events": 200, "concurrency": 8},
    "router": {"events": 200},
    "agencies": {"events": 100, "rate": 20.0, "seconds": 5.0, "warm_up": 0.0},
    "replay": {"events": 300},
    "webhooks": {"events": 50, "in_flight": 4},
}
# Seconds each benchmark may run (its stack's start and stop included) before it fails.
TIME_LIMITS: dict[str, dict[str, float]] = {
    "full": {"codec": 900, "intake": 1800, "router": 1800, "agencies": 1800, "replay": 3600, "webhooks": 900},
    "quick": {"codec": 300, "intake": 600, "router": 600, "agencies": 900, "replay": 900, "webhooks": 300},
    "smoke": {"codec": 120, "intake": 240, "router": 240, "agencies": 300, "replay": 180, "webhooks": 180},
}
# What results.json keeps of every benchmark that ran (the smoke test checks them all).
RECORDED = ("sent", "arrived", "stages", "cpu", "machine", "commit", "time_limit_s", "took_s")


def _runs(
    sizes: dict[str, dict[str, Any]], fixture: replay.Fixture
) -> dict[str, Callable[[], dict[str, Any]]]:
    c, i, r, a, p, w = (
        sizes[name] for name in ("codec", "intake", "router", "agencies", "replay", "webhooks")
    )
    return {
        "codec": lambda: codec.run(c["records"], c["rounds"]),
        "intake": lambda: intake.main(i["events"], i["concurrency"]),
        "router": lambda: router.main(r["events"]),
        "agencies": lambda: agencies.main(
            a["events"], a["rate"], a["seconds"], None, True, warm_up=a["warm_up"]
        ),
        "replay": lambda: replay.measure(p["events"], fixture),
        "webhooks": lambda: webhooks.main(w["events"], w["in_flight"]),
    }


def measured(name: str, run: Callable[[], dict[str, Any]], limit: float) -> dict[str, Any]:
    """Run one benchmark under its time limit, measuring the CPU of every process it
    starts; keep its figures only if its counts prove the work was done."""
    figures: dict[str, Any]
    before, commit = machine(), git_commit()
    began = time.perf_counter()
    meter = CpuMeter()
    try:
        with time_limit(limit, name), meter:
            figures = run()
        prove_figures(name, figures)
    except WorkNotDone as failure:
        print(f"FAILED {failure}", file=sys.stderr, flush=True)
        figures = {"error": str(failure)[:500], "sent": failure.sent, "arrived": failure.arrived}
    except (Exception, TimeLimitExceeded) as exc:  # noqa: BLE001 - record it, run the rest, fail at the end
        traceback.print_exc()
        figures = {"error": f"{type(exc).__name__}: {exc}"[:500], "sent": None, "arrived": None}
    figures.setdefault("stages", {})
    figures["cpu"] = meter.report()
    figures["machine"] = before
    figures["commit"] = commit
    figures["time_limit_s"] = limit
    figures["took_s"] = round(time.perf_counter() - began, 1)
    return figures


def _n(value: Any, unit: str = "") -> str:
    if isinstance(value, int | float):
        return f"{value:,.0f}{unit}" if abs(value) >= 100 else f"{value:,.1f}{unit}"
    return "–"


def table(results: dict[str, Any]) -> str:
    """The markdown table: what was measured, against what, and the ratio."""
    rows = ["| benchmark | measured | baseline in the same run | ratio |", "|---|---|---|---|"]
    got = results["benchmarks"]

    def row(name: str, build: Callable[[dict[str, Any]], tuple[str, str, str, str]]) -> None:
        figures = got.get(name)
        if figures is None:
            return
        if "error" in figures:
            rows.append(f"| {name} | failed: {figures['error']} | | |")
            return
        rows.append("| " + " | ".join(build(figures)) + " |")

    row(
        "intake",
        lambda f: (
            f"intake: deaths accepted over HTTP ({f['concurrency']} clients)",
            f"{_n(f['accepted_per_s'])} events/s (p50 {_n(f['p50_ms'])} ms, p99 {_n(f['p99_ms'])} ms)",
            f"GET /healthz: {_n(f['floor_per_s'])} requests/s"
            f" (wrk's own ceiling: {_n(f.get('load_generator_per_s'))} requests/s)",
            f"{f['ratio']:.2f}",
        ),
    )
    row(
        "router",
        lambda f: (
            f"router: {f['agencies']} agencies, transactions, consent, minimising",
            f"{_n(f['router_per_s'])} events/s",
            f"bare aiokafka pipe, same fan-out: {_n(f['bare_per_s'])} events/s",
            f"{f['ratio']:.2f}",
        ),
    )
    row(
        "router",
        lambda f: (
            "this broker on this machine: Kafka's ProducerPerformance,"
            f" {f['producer_performance']['record_size']:,}-byte records (the router's mean),"
            " acks=all, SASL_SSL",
            f"{_n(f['producer_performance']['records_per_s'])} records/s"
            f" = {_n(f['limit_per_s'])} events/s of the router's output",
            f"bare pipe: {_n(f['bare_per_s'])} events/s",
            f"{f['bare_to_limit']:.2f} (bare / limit)",
        ),
    )
    row(
        "agencies",
        lambda f: (
            f"agency consumer with receipts ({f['throughput']['agency']})",
            f"{_n(f['throughput']['consumer_per_s'])} events/s",
            f"bare consume + one INSERT + commit per batch: {_n(f['throughput']['bare_per_s'])} events/s;"
            f" the same with each message's signature checked: {_n(f['throughput']['bare_checked_per_s'])}"
            " events/s",
            f"{f['throughput']['ratio']:.2f}; {f['throughput']['ratio_to_checked']:.2f}",
        ),
    )
    row(
        "agencies",
        lambda f: (
            f"end to end at {f['latency']['target_per_s']:g} events/s for {f['latency']['seconds']:g} s"
            " (intake → every agency's final receipt stored)",
            f"p50 {_n(f['latency']['end_to_end_p50_s'], ' s')},"
            f" p99 {_n(f['latency']['end_to_end_p99_s'], ' s')}"
            f" ({f['latency']['complete_events']:,} of {f['latency']['accepted']:,} events complete)",
            f"intake's answer: p50 {_n(f['latency']['intake_answer_p50_s'], ' s')},"
            f" p99 {_n(f['latency']['intake_answer_p99_s'], ' s')}",
            "–",
        ),
    )
    row(
        "replay",
        lambda f: (
            f"replay of {f['events']:,} stored events to {f['agency']}",
            f"{_n(f['replay_per_s'])} events/s",
            f"stored bytes → Kafka, undecided: {_n(f['bare_per_s'])} events/s",
            f"{f['ratio']:.2f}",
        ),
    )
    row(
        "webhooks",
        lambda f: (
            f"webhook bridge to the reference receiver over HTTPS ({f['in_flight']} in flight)",
            f"{_n(f['bridge_per_s'])} deliveries/s",
            f"bare httpx POST loop, the same signed requests: {_n(f['bare_per_s'])} deliveries/s",
            f"{f['ratio']:.2f}",
        ),
    )
    row(
        "codec",
        lambda f: (
            f"Avro codec, {f['message_bytes']}-byte DeathRegistered (encode / decode)",
            f"{_n(f['encode_ours'])} / {_n(f['decode_ours'])} records/s",
            f"bare fastavro: {_n(f['encode_fastavro'])} / {_n(f['decode_fastavro'])}",
            f"{f['encode_ratio']:.2f} / {f['decode_ratio']:.2f}",
        ),
    )
    machine = results["machine"]
    rows.append("")
    rows.append(
        f"{machine['cpus']} CPUs, Python {machine['python']}, Kafka {machine['kafka']};"
        f" {results['finished_at'][:16].replace('T', ' ')} UTC; commit {results['commit'][:12]};"
        f" `{results['command']}` ({results['took_s'] / 60:.0f} min)."
    )
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sizing = parser.add_mutually_exclusive_group()
    sizing.add_argument("--quick", action="store_true", help="smaller sizes (5-10 minutes)")
    sizing.add_argument("--smoke", action="store_true", help="tiny sizes: proves the work, measures nothing")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where to write the results")
    parser.add_argument("--only", nargs="+", choices=sorted(FULL), help="run only these")
    parser.add_argument("--time-limit", type=float, help="seconds each benchmark may run (default: by size)")
    parser.add_argument(
        "--replay-fixture",
        choices=("signed", "unsigned"),
        default="signed",
        help="unsigned: a deliberately broken replay fixture, which must fail the run",
    )
    args = parser.parse_args()
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = {"smoke": SMOKE, "quick": QUICK, "full": FULL}[size]
    chosen = args.only or list(FULL)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python -m bench"
        + (f" --{size}" if size != "full" else "")
        + (f" --only {' '.join(chosen)}" if args.only else "")
        + (f" --replay-fixture {args.replay_fixture}" if args.replay_fixture != "signed" else ""),
        "sizes": {name: sizes[name] for name in chosen},
        "machine": {
            "cpus": machine()["cores"],
            "python": platform.python_version(),
            "kafka": Settings().kafka_version,
            "platform": platform.platform(),
        },
        "commit": git_commit(),
        "benchmarks": {},
    }
    failed = False
    for name, run in _runs(sizes, args.replay_fixture).items():
        if name not in chosen:
            continue
        print(f"\n=== {name} ===", flush=True)
        figures = measured(name, run, args.time_limit or TIME_LIMITS[size][name])
        failed = failed or "error" in figures
        results["benchmarks"][name] = figures
    results["took_s"] = round(time.perf_counter() - started, 1)
    results["finished_at"] = datetime.now(UTC).isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    markdown = table(results)
    (args.out / "results.md").write_text(markdown)
    print("\n" + markdown)
    print(f"Written to {args.out / 'results.json'} and {args.out / 'results.md'}.")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
