"""`tuo receipts`: agencies' receipt deadlines, overdue deliveries, and redelivery."""

from __future__ import annotations

import getpass
from datetime import timedelta
from typing import Annotated

import asyncpg
import typer
from rich.table import Table

from operators import redelivery
from operators.cli.shared import AgencyArg, command_settings, console, fail, when, with_pool
from router import tracker
from runtime.kafka import Topics

receipts_app = typer.Typer(
    help="Agencies' receipts: deadlines, overdue deliveries, redelivery.", no_args_is_help=True
)


MAX_DEADLINE_MINUTES = 30 * 24 * 60


@receipts_app.command("overdue")
def receipts_overdue(
    agency: Annotated[str | None, typer.Option(help="Only this agency.")] = None,
) -> None:
    """Deliveries still without a final receipt after their agency's deadline."""

    rows = with_pool(lambda pool: tracker.overdue_deliveries(pool, agency))
    if not rows:
        console.print("No overdue receipts.")
        return
    table = Table("agency", "reference", "event", "delivered at", "due at", "latest receipt", caption="UTC")
    for r in rows:
        table.add_row(
            r["agency"],
            r["reference"],
            str(r["event_id"]),
            when(r["delivered_at"].isoformat()),
            when(r["due_at"].isoformat()),
            (r["receipt"] or "none").lower(),
        )
    console.print(table)
    console.print(
        f'{len(rows)} overdue. Send them again with `tuo receipts redeliver AGENCY --overdue --reason "…"`.'
    )


@receipts_app.command("deadline")
def receipts_deadline(
    agency: AgencyArg,
    minutes: Annotated[
        float,
        typer.Argument(
            min=0.01, max=MAX_DEADLINE_MINUTES, help="Minutes the agency has to answer (up to 30 days)."
        ),
    ],
) -> None:
    """Set how long an agency has to send a final receipt for each delivery."""

    if not with_pool(lambda pool: tracker.set_deadline(pool, agency, timedelta(minutes=minutes))):
        raise fail(f"no agency {agency!r} has a subscription; see `tuo subscriptions list`")
    console.print(f"{agency} must answer within {timedelta(minutes=minutes)}.")


@receipts_app.command("redeliver")
def receipts_redeliver(
    agency: AgencyArg,
    reason: Annotated[str, typer.Option(help="Why (kept with the redelivery, 3-500 characters).")],
    reference: Annotated[
        list[str] | None, typer.Option("--reference", "-r", help="An event's reference; repeatable.")
    ] = None,
    overdue: Annotated[bool, typer.Option("--overdue", help="Every overdue delivery to the agency.")] = False,
    by: Annotated[str, typer.Option(help="Who asks (recorded).")] = "",
) -> None:
    """Send events to one agency again. Today's subscriptions and consent decide; the
    agency's SDK answers a repeat it already handled with a duplicate receipt."""
    if bool(reference) == overdue:
        raise fail("name events with --reference, or use --overdue (one of the two)")
    requested_by = by.strip() or getpass.getuser()

    async def queue(pool: asyncpg.Pool) -> redelivery.Redelivery:
        if overdue:
            event_ids = await redelivery.overdue_events(pool, agency)
        else:
            event_ids = await redelivery.events_for_references(
                pool, [r.strip().upper() for r in reference or []]
            )
        return await redelivery.redeliver(
            pool,
            Topics(command_settings().topic_prefix),
            agency=agency,
            event_ids=event_ids,
            requested_by=requested_by,
            reason=reason,
        )

    try:
        queued = with_pool(queue)
    except redelivery.RedeliveryRefused as exc:
        raise fail(str(exc)) from exc
    if not queued.event_ids:
        console.print(f"Nothing to redeliver: no overdue deliveries to {agency}.")
        return
    console.print(f"Queued {len(queued.event_ids)} event(s) for redelivery to {agency}.")
