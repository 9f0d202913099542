"""`tuo replay`: send stored events again to one agency, decided on today's subscriptions and consent."""

from __future__ import annotations

import asyncio
import getpass
import signal
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated

import asyncpg
import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from operators import replay
from operators.cli.shared import AgencyArg, clear_errors, command_settings, console, fail, when, with_pool
from router import looks
from runtime.database import open_pool
from runtime.settings import Settings

replay_app = typer.Typer(
    help="Send stored events again to one agency, decided on today's subscriptions and consent.",
    no_args_is_help=True,
)


WITHHELD_LABELS = {
    "WITHHELD_NO_CONSENT": "no consent today",
    "WITHHELD_NO_SUBSCRIPTION": "not subscribed today",
    "WITHHELD_AREA_UNKNOWN": "area unknown (postcode not in the directory)",
    "WITHHELD_NOT_OF_INTEREST": "not of interest (not registered by the agency)",
    "BLOCKED": "blocked by policy",
    replay.UNROUTABLE: "not routable (see `tuo dlq list`)",
    replay.VOIDED: "voided (never replayed)",
}


def _moment(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise fail(f"{option} {value[:40]!r} is not a date and time, like 2026-11-01T09:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@replay_app.command("run")
def replay_run(
    agency: AgencyArg,
    reason: Annotated[str, typer.Option(help="Why (kept with the replay, 3-500 characters).")],
    since: Annotated[
        str | None, typer.Option(help="Events recorded at or after (ISO 8601, UTC if no zone).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Events recorded before (ISO 8601).")] = None,
    subject: Annotated[str | None, typer.Option(help="One person: subject id or NINO.")] = None,
    event_id: Annotated[list[str] | None, typer.Option("--event-id", help="An event id; repeatable.")] = None,
    reference: Annotated[
        list[str] | None, typer.Option("--reference", "-r", help="An event's reference; repeatable.")
    ] = None,
    event_type: Annotated[
        list[str] | None,
        typer.Option("--event-type", help="Only this type, e.g. DeathRegistered; repeatable."),
    ] = None,
    everything: Annotated[
        bool, typer.Option("--everything", help="Every stored event (e.g. for a newly onboarded agency).")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be sent and withheld; send nothing.")
    ] = False,
    rate: Annotated[int, typer.Option(help="At most this many events a second.")] = replay.DEFAULT_RATE,
    by: Annotated[str, typer.Option(help="Who asks (recorded).")] = "",
) -> None:
    """Replay stored events to AGENCY only: consent and subscriptions are checked now,
    each event keeps its id (the agency de-duplicates), and the replay is recorded."""
    settings = command_settings()
    try:
        selection = replay.Selection.of(
            since=_moment(since, "--since"),
            until=_moment(until, "--until"),
            subject=subject,
            event_ids=event_id or [],
            references=reference or [],
            event_types=event_type or [],
            everything=everything,
            pseudonym_key=settings.require_pseudonym_key,
        )
    except replay.ReplayRefused as exc:
        raise fail(str(exc)) from exc

    async def begin(pool: asyncpg.Pool) -> replay.Replay:
        if selection.subject_id is not None:  # one person's events chosen: a look at their records
            await looks.record_look(
                pool,
                who=by.strip() or getpass.getuser(),
                role="operator",
                action=looks.Action.REPLAY,
                reason=reason,
                subject_ids=[selection.subject_id],
            )
        return await replay.start(
            pool,
            settings,
            agency=agency,
            selection=selection,
            reason=reason,
            requested_by=by.strip() or getpass.getuser(),
            dry_run=dry_run,
            rate=rate,
        )

    _run_replay(settings, begin)


@replay_app.command("resume")
def replay_resume(
    replay_id: Annotated[str, typer.Argument(help="The replay's id (`tuo replay list`).")],
) -> None:
    """Carry on with a replay that was interrupted, from where it stopped."""
    _run_replay(command_settings(), lambda pool: replay.find(pool, replay_id))


@replay_app.command("list")
def replay_list(
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")] = 20,
) -> None:
    """Replays: who asked, why, what they sent and withheld."""
    rows = with_pool(lambda pool: replay.recent(pool, limit))
    if not rows:
        console.print("No replays yet.")
        return
    table = Table("replay", "agency", "started", "by", "reason", "status", "sent", "withheld", caption="UTC")
    for row in rows:
        found = replay.Replay.of(row)
        status = ("dry run, " if found.dry_run else "") + found.status
        if found.status == "running":
            status += f" ({found.tally.examined:,} of {found.tally.selected:,} done)"
        table.add_row(
            found.id,
            found.agency,
            when(row["started_at"].isoformat()),
            found.requested_by,
            found.reason,
            status,
            f"{found.tally.sent:,}" + _corrections_words(found.tally, brief=True),
            _withheld_words(found.tally),
        )
    console.print(table)


def _corrections_words(tally: replay.Tally, *, brief: bool = False, verb: str = "sent") -> str:
    """Corrections outside the selection that went with their originals, if any."""
    n = tally.corrections_sent
    if not n:
        return ""
    if brief:
        return f" + {n:,} correction{'s' if n != 1 else ''}"
    return (
        f", and {n:,} correction{'s' if n != 1 else ''} from outside the selection {verb}"
        " with their originals"
    )


def _withheld_words(tally: replay.Tally) -> str:
    counts = sorted(tally.withheld.items())
    return ", ".join(f"{n:,} {WITHHELD_LABELS.get(k, k)}" for k, n in counts) or "none"


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} events/s" if speed else "- events/s")


def _run_replay(settings: Settings, prepare: Callable[[asyncpg.Pool], Awaitable[replay.Replay]]) -> None:
    async def run() -> replay.Replay:
        pool = await open_pool(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Ctrl-C or SIGTERM: finish the batch in hand, save the position, then stop.
        in_main_thread = threading.current_thread() is threading.main_thread()
        signals = (signal.SIGINT, signal.SIGTERM) if in_main_thread else ()
        for signum in signals:
            loop.add_signal_handler(signum, stop.set)
        try:
            chosen = await prepare(pool)
            label = f"{'Dry run' if chosen.dry_run else 'Replaying'} to {chosen.agency}"
            console.print(f"Replay {chosen.id}: {chosen.tally.selected:,} stored events selected.")
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                _Rate(),
                TimeRemainingColumn(),
                console=console,
            ) as progress:
                task = progress.add_task(label, total=chosen.tally.selected, completed=chosen.tally.examined)
                return await replay.Replayer(settings, pool, chosen).run(
                    lambda tally: progress.update(task, completed=tally.examined), stop
                )
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)
            await pool.close()

    try:
        with clear_errors():
            done = asyncio.run(run())
    except (replay.ReplayRefused, looks.LookRefused) as exc:
        raise fail(str(exc)) from exc
    tally = done.tally
    verb = "would be sent" if done.dry_run else "sent"
    console.print(
        f"{tally.sent:,} of {tally.examined:,} events {verb} to {done.agency}"
        f"{_corrections_words(tally, verb=verb)}; withheld: {_withheld_words(tally)}."
    )
    if done.status != "finished":
        console.print(f"Stopped before the end. Carry on with `tuo replay resume {done.id}`.")
        raise typer.Exit(code=3)
