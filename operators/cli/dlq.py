"""`tuo dlq`: dead letters, messages no component could process; list, show, redrive after a fix."""

from __future__ import annotations

import getpass
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import asyncpg
import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from operators import dead_letters as dlq
from operators import lag as consumer_lag
from operators.cli.shared import command_settings, console, fail, with_pool
from router import looks
from runtime import kafka

T = TypeVar("T")

dlq_app = typer.Typer(
    help="Dead letters: messages no component could process; list, show, redrive after a fix.",
    no_args_is_help=True,
)


MAX_DLQ_LIMIT = 10_000


def dlq_call(work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    try:
        return with_pool(work)
    except (
        dlq.NotADeadLetterId,
        dlq.NoSuchDeadLetter,
        dlq.RedriveRefused,
        dlq.DeadLettersUnreadable,
        consumer_lag.UnknownAgency,
        kafka.NoCredentials,
    ) as exc:
        raise fail(escape(str(exc))) from exc


def _redriven(letter: dlq.StoredDeadLetter) -> Text:
    if not letter.redrives:
        return Text("no")
    last = letter.redrives[-1]
    done = last.action + (f" to {last.agency}" if last.agency else "")
    times = f" ({len(letter.redrives)}×)" if len(letter.redrives) > 1 else ""
    return Text(f"{done}{times} by {last.requested_by}, {dlq.age(last.requested_at)} ago: {last.reason}")


def _event_label(letter: dlq.StoredDeadLetter) -> str:
    if letter.event_id is not None:
        return str(letter.event_id)
    return "(no ce_id)" if letter.claimed_id is None else f"(not an event id: {letter.claimed_id[:20]})"


@dlq_app.command("list")
def dlq_list(
    agency: Annotated[
        str | None, typer.Option(help="Only this agency's dead letters (`bus`: the shared topic's).")
    ] = None,
    limit: Annotated[int, typer.Option(help=f"The most recent N (1-{MAX_DLQ_LIMIT}).")] = 50,
) -> None:
    """Dead letters, most recent first: why, from where, how long ago, and whether
    they have been redriven (by whom, why)."""
    if not 1 <= limit <= MAX_DLQ_LIMIT:
        raise fail(f"--limit must be from 1 to {MAX_DLQ_LIMIT}")
    settings = command_settings()
    letters = dlq_call(lambda pool: dlq.list_dead_letters(settings, pool, agency=agency, limit=limit))
    if not letters:
        console.print("No dead letters" + (f" for {escape(agency)}." if agency else "."))
        return
    table = Table("id", "age", "component", "reason", "origin", "event", "type", "redriven")
    for letter in letters:
        table.add_row(
            Text(str(letter.id)),
            letter.age,
            Text(letter.component or "?"),
            Text(dlq.printable(letter.reason or "?", 70)),
            Text(letter.origin),
            Text(_event_label(letter)),
            Text(letter.event_type or ""),
            _redriven(letter),
        )
    console.print(table)
    console.print(
        f"{len(letters)} dead letter(s). `tuo dlq show ID --reason …` for one; once its cause is fixed, "
        '`tuo dlq redrive ID --reason "…"`.'
    )


@dlq_app.command("show")
def dlq_show(
    letter_id: Annotated[str, typer.Argument(help="As `tuo dlq list` shows it, e.g. bus:0:17.")],
    reason: Annotated[
        str, typer.Option(help="Why you look (3-500 characters): recorded, and shown to the person.")
    ],
    by: Annotated[str, typer.Option(help="Who looks (recorded).")] = "",
) -> None:
    """One dead letter: where it came from, why, and what it holds (field names and
    sizes only: the values are personal data). The look is recorded first, with who and
    why, and the person whose event it is sees it (router.looks)."""
    settings = command_settings()

    async def look(pool: asyncpg.Pool) -> dlq.StoredDeadLetter:
        letter = await dlq.show_dead_letter(settings, pool, letter_id)
        await looks.record_look(
            pool,
            who=by.strip() or getpass.getuser(),
            role="operator",
            action=looks.Action.DEAD_LETTER,
            reason=reason,
            subject_ids=await dlq.subjects_of(pool, letter),
            event_ids=[letter.event_id] if letter.event_id is not None else [],
        )
        return letter

    try:
        letter = dlq_call(look)
    except looks.LookRefused as exc:
        raise fail(str(exc)) from exc
    try:
        plan = dlq.plan_redrive(settings.topic_prefix, letter)
        redrive = (
            "republish the stored original on the life-events topic"
            if isinstance(plan, dlq.Republish)
            else f"redeliver the stored original to {plan.agency}"
        )
    except dlq.RedriveRefused as exc:
        redrive = f"no: {exc}"
    fields = letter.fields()
    table = Table(show_header=False, box=None)
    for name, value in (
        ("dead letter", f"{letter.id} ({letter.topic})"),
        ("dead-lettered", f"{letter.dead_lettered_at:%Y-%m-%d %H:%M:%S} UTC, {letter.age} ago"),
        ("component", letter.component or "?"),
        ("reason", letter.reason or "?"),
        ("origin", letter.origin),
        ("event", f"{_event_label(letter)} {letter.event_type or ''}".strip()),
        ("schema", letter.schema()),
        ("size", f"key {letter.key_size} bytes, value {letter.value_size} bytes"),
        ("fields", ", ".join(f"{n} ({size})" for n, size in fields) if fields else "none decoded"),
        ("headers", ", ".join(letter.header_names) or "none"),
        ("redriven", str(_redriven(letter))),
        ("redrive", redrive),
    ):
        table.add_row(Text(name, style="bold"), Text(value))
    console.print(table)


@dlq_app.command("redrive")
def dlq_redrive(
    letter_ids: Annotated[
        list[str] | None, typer.Argument(help="Dead letters' ids as `tuo dlq list` shows them.")
    ] = None,
    reason: Annotated[str, typer.Option(help="Why (kept with the redrive, 3-500 characters).")] = "",
    every: Annotated[bool, typer.Option("--all", help="Every dead letter not redriven yet.")] = False,
    by: Annotated[str, typer.Option(help="Who asks (recorded).")] = "",
    again: Annotated[bool, typer.Option("--again", help="Redrive even if redriven before.")] = False,
    agency: Annotated[
        str | None, typer.Option(help="With --all: only this agency's (`bus`: the shared topic's).")
    ] = None,
) -> None:
    """Send dead letters through the bus again once their cause is fixed: the stored
    original, never the dead letter's own bytes, recorded with who and why. One
    that cannot be redriven is left in place and says why."""
    if bool(letter_ids) == every:
        raise fail("name dead letters by id, or use --all (one of the two)")
    settings = command_settings()
    outcomes = dlq_call(
        lambda pool: dlq.redrive(
            settings,
            pool,
            None if every else list(letter_ids or []),
            reason=reason,
            requested_by=by.strip() or getpass.getuser(),
            again=again,
            agency=agency,
        )
    )
    if not outcomes:
        console.print("No dead letters.")
        return
    table = Table("id", "outcome", "detail")
    for outcome in outcomes:
        style = {"redriven": "green", "skipped": "yellow"}.get(outcome.outcome, "red")
        table.add_row(Text(str(outcome.id)), Text(outcome.outcome, style=style), Text(outcome.detail))
    console.print(table)
    counts = {k: sum(o.outcome == k for o in outcomes) for k in ("redriven", "skipped", "refused")}
    console.print(
        f"{counts['redriven']} redriven, {counts['skipped']} redriven before (skipped), "
        f"{counts['refused']} refused and left in place."
    )
    if counts["refused"] and not every:
        raise typer.Exit(code=1)
