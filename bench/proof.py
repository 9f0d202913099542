"""What every benchmark must show before it may print a rate: that the work was done.

A benchmark counts what arrived at the far end (events stored, messages on a topic
counted by ``ce_id`` under read_committed, receipts stored) and hands the count to
``prove`` with what it sent. If they differ, ``WorkNotDone`` carries both counts and
no rate is printed or recorded. ``python -m bench`` checks every benchmark's
``sent`` and ``arrived`` again before it writes a figure.

Also here: the time limit each benchmark runs under, the CPU each process of the
run used (read from /proc), percentiles, the machine and the git commit.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

PROJECT = Path(__file__).resolve().parent.parent


class WorkNotDone(RuntimeError):
    """What arrived at the far end is not what was sent: the run proves nothing."""

    def __init__(self, benchmark: str, sent: Any, arrived: Any, detail: str = "") -> None:
        self.benchmark, self.sent, self.arrived = benchmark, sent, arrived
        super().__init__(
            f"{benchmark}: sent {sent}, arrived {arrived}"
            + (f" ({detail})" if detail else "")
            + "; no rate recorded"
        )


class TimeLimitExceeded(SystemExit):
    """The benchmark ran past its time limit. A ``SystemExit``, so that raised from the
    alarm into whichever task is running, it leaves the event loop (asyncio re-raises
    only SystemExit and KeyboardInterrupt) and no ``except Exception`` swallows it."""


def prove(benchmark: str, sent: Any, arrived: Any, detail: str = "") -> None:
    """Raise ``WorkNotDone`` unless ``sent`` and ``arrived`` are the same positive count."""
    counts = (sent, arrived)
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in counts):
        raise WorkNotDone(benchmark, sent, arrived, detail or "the counts are not whole numbers")
    if sent <= 0 or sent != arrived:
        raise WorkNotDone(benchmark, sent, arrived, detail)


def prove_figures(benchmark: str, figures: dict[str, Any]) -> None:
    """The check ``python -m bench`` makes on every benchmark's figures: top-level ``sent``
    and ``arrived``, equal; and the same of every part (a dict value with both keys)."""
    if "sent" not in figures or "arrived" not in figures:
        raise WorkNotDone(
            benchmark,
            figures.get("sent"),
            figures.get("arrived"),
            "the benchmark did not report its sent and arrived counts",
        )
    prove(benchmark, figures["sent"], figures["arrived"], str(figures.get("proof", "")))
    for part, value in figures.items():
        if isinstance(value, dict) and "sent" in value and "arrived" in value:
            prove(f"{benchmark}.{part}", value["sent"], value["arrived"], str(value.get("proof", "")))


async def count_by_ce_id(
    options: dict[str, Any], topic: str, among: Iterable[str] | None = None
) -> tuple[int, int]:
    """Messages committed on ``topic`` now (read_committed, from the start):
    (distinct ``ce_id`` values, among ``among`` when given; messages read)."""
    seen, read = await ce_ids_on(options, topic, among)
    return len(seen), read


async def ce_ids_on(
    options: dict[str, Any], topic: str, among: Iterable[str] | None = None
) -> tuple[set[str], int]:
    """Messages committed on ``topic`` now (read_committed, from the start): (their
    distinct ``ce_id`` values, among ``among`` when given; messages read)."""
    wanted = None if among is None else set(among)
    consumer = AIOKafkaConsumer(
        topic,
        **options,  # no group: every partition is assigned to us
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    seen: set[str] = set()
    read = 0
    try:
        deadline = time.monotonic() + 30
        while not consumer.assignment():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no partitions of {topic} assigned within 30 s")
            await consumer.getmany(timeout_ms=100)
        partitions: list[TopicPartition] = sorted(consumer.assignment())
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        # The last stable offset: transaction markers take offsets but are never returned.
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=1000, max_records=10_000)).values():
                read += len(records)
                for record in records:
                    ce_id = next((bytes(v).decode() for k, v in record.headers if k == "ce_id"), None)
                    if ce_id is not None and (wanted is None or ce_id in wanted):
                        seen.add(ce_id)
        return seen, read
    finally:
        await consumer.stop()


def percentiles(seconds: list[float]) -> dict[str, float | int | None]:
    """p50/p95/p99 in milliseconds of ``seconds`` (null when there are fewer than two:
    JSON has no NaN)."""
    if len(seconds) < 2:
        return {"count": len(seconds), "p50_ms": None, "p95_ms": None, "p99_ms": None}
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    return {
        "count": len(seconds),
        "p50_ms": round(cuts[49] * 1000, 2),
        "p95_ms": round(cuts[94] * 1000, 2),
        "p99_ms": round(cuts[98] * 1000, 2),
    }


# The machine


def machine() -> dict[str, Any]:
    """Cores and load average now (call it before the run)."""
    one, five, fifteen = os.getloadavg()
    return {
        "cores": os.cpu_count(),
        "load_average_before": [round(one, 2), round(five, 2), round(fifteen, 2)],
    }


def git_commit() -> str:
    """The commit the benchmark ran at, with "-dirty" when the work tree has changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if changed else "")


# CPU of each process


_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, str, float] | None:
    """(parent pid, name, CPU seconds used) of ``pid``, from /proc (None once it has gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw.rsplit(")", 1)[1].split()
    return int(fields[1]), name, (int(fields[11]) + int(fields[12])) / _TICKS


def _label(pid: int, name: str) -> str:
    """A short, stable name for a process: what it runs, not its arguments (which may
    hold settings)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return name
    words = [a.decode(errors="replace") for a in argv if a]
    if name == "java" and any("kafka" in w.lower() for w in words):
        return "kafka broker (java)"
    if name.startswith("postgres") or any(w.endswith("/postgres") for w in words[:1]):
        return "postgresql"
    names = [Path(w).name for w in words[:2]]
    if "tuo" in names:  # `tuo run <components>`: its settings come from the environment
        return " ".join(["tuo", *words[names.index("tuo") + 1 :]])[:80]
    if "multiprocessing" in " ".join(words):
        return "spawned python workers"
    return name


# Scratch stacks live here (bench.scratch); PostgreSQL's server detaches from the
# process that starts it (pg_ctl), so it is found by its data directory instead.
SCRATCH_STATE = str(PROJECT / ".tuo" / "bench-")


class CpuMeter:
    """CPU seconds used while the meter runs by this process, each process started under
    it, and each process of a scratch stack (named by its state directory) with its
    children; sampled from /proc every ``interval`` seconds (a process that ends between
    two samples loses at most that interval's CPU)."""

    def __init__(self, interval: float = 0.5, marker: str = SCRATCH_STATE) -> None:
        self.interval = interval
        self.marker = marker.encode()
        self.root = os.getpid()
        self.first: dict[int, float] = {}  # pid → CPU seconds when first seen (0 if born meanwhile)
        self.last: dict[int, tuple[str, float]] = {}  # pid → (label, CPU seconds when last seen)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, name="cpu-meter", daemon=True)
        self.started = 0.0
        self.wall = 0.0

    def _descendants(self) -> dict[int, tuple[int, str, float]]:
        table: dict[int, tuple[int, str, float]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
                table[int(entry.name)] = stat
        ours = {self.root} | {pid for pid in table if self._mentions_marker(pid)}
        grew = True
        while grew:  # parents before children, whatever the order of /proc
            grew = False
            for pid, (parent, _, _) in table.items():
                if parent in ours and pid not in ours:
                    ours.add(pid)
                    grew = True
        return {pid: table[pid] for pid in ours if pid in table}

    def _mentions_marker(self, pid: int) -> bool:
        try:
            return self.marker in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False

    def _sample(self, initial: bool = False) -> None:
        for pid, (_, name, cpu) in self._descendants().items():
            if pid not in self.first:
                self.first[pid] = cpu if initial else 0.0
            label = self.last[pid][0] if pid in self.last else _label(pid, name)
            self.last[pid] = (label, cpu)

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> CpuMeter:
        self.started = time.perf_counter()
        self._sample(initial=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall = time.perf_counter() - self.started

    def report(self) -> dict[str, Any]:
        """Per kind of process: CPU seconds, and the share of one core over the run."""
        used: dict[str, float] = {}
        for pid, (label, cpu) in self.last.items():
            name = "this process (the benchmark and its clients)" if pid == self.root else label
            used[name] = used.get(name, 0.0) + max(0.0, cpu - self.first[pid])
        wall = max(self.wall, 1e-6)
        return {
            "wall_s": round(self.wall, 1),
            "processes": {
                name: {"cpu_s": round(cpu, 1), "cores_busy": round(cpu / wall, 2)}
                for name, cpu in sorted(used.items(), key=lambda kv: -kv[1])
                if cpu > 0
            },
        }


# The time limit


@contextmanager
def time_limit(seconds: float, benchmark: str) -> Iterator[None]:
    """Fail the benchmark with ``TimeLimitExceeded`` after ``seconds`` (raised in the main
    thread, so its stack is purged on the way out); if it still has not returned two
    minutes later, dump every thread's stack and exit, so it never hangs without a word."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("a time limit needs the main thread (SIGALRM)")

    def expired(signum: int, frame: FrameType | None) -> None:
        raise TimeLimitExceeded(f"{benchmark}: still running after its time limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds + 120, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)
