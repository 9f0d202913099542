"""`tuo subscriptions`: which agencies receive which events and fields, on what basis."""

from __future__ import annotations

from typing import Annotated

import asyncpg
import typer
from pydantic import ValidationError
from rich.table import Table

from operators.cli.shared import console, fail, when, with_pool
from router.store import (
    area_unknown_decisions,
    list_subscriptions,
    set_subscription_status,
    upsert_subscription,
)
from router.subscription_request import SubscriptionRequest
from runtime.access import Principal
from runtime.kafka import ensure_topics
from runtime.settings import load_settings
from schemas.catalogue import MINIMISED
from schemas.fieldpaths import grantable_paths

subscriptions_app = typer.Typer(help="Which agencies receive which events and fields.", no_args_is_help=True)


@subscriptions_app.command("list")
def subscriptions_list() -> None:
    """Every subscription: agency, event type, legal basis, fields, condition, status."""
    rows = with_pool(list_subscriptions)
    table = Table("agency", "event type", "basis", "fields", "condition", "status")
    for row in rows:
        basis = row["legal_basis"] + (f": {row['statute']}" if row["statute"] else "")
        fields = ", ".join(row["fields"]) if row["fields"] is not None else "(all)"
        table.add_row(row["agency"], row["event_type"], basis, fields, row["condition"] or "-", row["status"])
    console.print(table)


@subscriptions_app.command("paths")
def subscriptions_paths(event_type: Annotated[str, typer.Argument(help="e.g. DeathRegistered")]) -> None:
    """The field paths a subscription to an event type can grant, one by one."""
    if event_type not in MINIMISED:
        raise fail(f"{event_type!r} is not an event type agencies subscribe to: {', '.join(MINIMISED)}")
    for path in sorted(grantable_paths(event_type)):
        console.print(path)


@subscriptions_app.command("add")
def subscriptions_add(
    agency: Annotated[str, typer.Argument(help="Agency code, e.g. council-york")],
    event_type: Annotated[str, typer.Argument(help="e.g. DeathRegistered")],
    basis: Annotated[str, typer.Option(help="statutory or consent")],
    field: Annotated[
        list[str],
        typer.Option(help="A field path the agency receives (repeat), see `tuo subscriptions paths`"),
    ],
    statute: Annotated[str | None, typer.Option(help="The statute, for a statutory basis")] = None,
    local_authority: Annotated[
        list[str] | None,
        typer.Option(
            help="Only events whose subject lives or lived in this local authority (GSS code, repeat),"
            " e.g. E06000014 for York"
        ),
    ] = None,
    registered_only: Annotated[
        bool,
        typer.Option(
            "--registered-only",
            help="Only the people the agency registered an interest in (`tuo agencies interest`);"
            " everyone else is withheld as not of interest",
        ),
    ] = False,
) -> None:
    """Add or replace an agency's subscription to an event type (active at once)."""
    try:
        subscription = SubscriptionRequest(
            agency=agency,
            event_type=event_type,
            basis=basis,
            statute=statute,
            fields=field,
            local_authorities=local_authority or [],
            registered_subjects=registered_only,
        )
    except ValidationError as exc:
        raise fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from exc

    async def add(pool: asyncpg.Pool) -> None:
        await upsert_subscription(pool, **subscription.as_row())
        await ensure_topics(load_settings(), [subscription.agency], principal=Principal.OPERATOR)

    with_pool(add)
    console.print(f"{agency} now receives {event_type} ({', '.join(subscription.fields)}) on {basis} basis.")


@subscriptions_app.command("area-unknown")
def subscriptions_area_unknown(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many, newest first.")] = 200,
) -> None:
    """Events withheld from councils because their postcode is not in the ONS Postcode
    Directory (no local authority): check and correct the postcode, or replay the event."""
    rows = with_pool(lambda pool: area_unknown_decisions(pool, limit))
    if not rows:
        console.print("No event was withheld for an unknown area.")
        return
    table = Table("reference", "event type", "decided at", "councils not told", caption="UTC")
    for r in rows:
        table.add_row(r.reference, r.event_type, when(r.decided_at.isoformat()), ", ".join(r.agencies))
    console.print(table)
    console.print(f"{len(rows)} event(s). See one with `tuo status REFERENCE`.")


@subscriptions_app.command("suspend")
def subscriptions_suspend(
    agency: str, event_type: Annotated[str | None, typer.Argument(help="Default: all of the agency's")] = None
) -> None:
    """Stop routing to an agency from the next routing decision on."""
    _set_status(agency, event_type, "suspended")


@subscriptions_app.command("activate")
def subscriptions_activate(
    agency: str, event_type: Annotated[str | None, typer.Argument(help="Default: all of the agency's")] = None
) -> None:
    """Resume routing to a suspended agency."""
    _set_status(agency, event_type, "active")


def _set_status(agency: str, event_type: str | None, status: str) -> None:
    changed = with_pool(lambda pool: set_subscription_status(pool, agency, event_type, status))
    if not changed:
        raise fail(f"{agency} has no subscription{' to ' + event_type if event_type else ''}")
    verb = "Suspended" if status == "suspended" else "Activated"
    console.print(f"{verb} {changed} subscription(s) of {agency}.")
