"""`tuo subscriptions`: which agencies receive which events and fields, on what basis."""

from __future__ import annotations

import getpass
from datetime import UTC, datetime
from typing import Annotated

import asyncpg
import typer
from pydantic import ValidationError
from rich.table import Table

from operators.cli.shared import console, fail, when, with_pool
from router import subscription_versions as versions
from router.store import (
    area_unknown_decisions,
    list_subscriptions,
    set_subscription_status,
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
    """Every subscription in force: agency, event type, legal basis, fields, condition,
    validity, status and version (`tuo subscriptions history` shows the earlier ones)."""
    rows = with_pool(list_subscriptions)
    table = Table("agency", "event type", "basis", "fields", "condition", "valid", "status", "version")
    for row in rows:
        basis = row["legal_basis"] + (f": {row['statute']}" if row["statute"] else "")
        fields = ", ".join(row["fields"]) if row["fields"] is not None else "(all)"
        table.add_row(
            row["agency"],
            row["event_type"],
            basis,
            fields,
            row["condition"] or "-",
            _validity(row["valid_from"], row["valid_to"]),
            row["status"],
            str(row["version"]),
        )
    console.print(table)


def _validity(start: datetime | None, end: datetime | None) -> str:
    if start is None and end is None:
        return "always"
    return f"{f'{start:%Y-%m-%d %H:%M}' if start else '…'} to {f'{end:%Y-%m-%d %H:%M}' if end else '…'} UTC"


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
    valid_from: Annotated[
        datetime | None, typer.Option(help="The agreement starts then (UTC unless an offset is given)")
    ] = None,
    valid_to: Annotated[
        datetime | None, typer.Option(help="The agreement ends then (UTC unless an offset)")
    ] = None,
    reason: Annotated[
        str, typer.Option(help="Why (kept with the new version, and published in the register).")
    ] = "",
    by: Annotated[str, typer.Option(help="Who makes the change (recorded).")] = "",
) -> None:
    """Add or replace an agency's subscription to an event type, in force at once as a new
    version (the one it replaces is kept: `tuo subscriptions history`)."""
    try:
        subscription = SubscriptionRequest(
            agency=agency,
            event_type=event_type,
            basis=basis,
            statute=statute,
            fields=field,
            local_authorities=local_authority or [],
            registered_subjects=registered_only,
            valid_from=_utc(valid_from),
            valid_to=_utc(valid_to),
        )
    except ValidationError as exc:
        raise fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from exc
    terms = subscription.terms()

    async def add(pool: asyncpg.Pool) -> int:
        async with pool.acquire() as conn, conn.transaction():
            version = await versions.write_terms(
                conn,
                agency,
                event_type,
                terms,
                changed_by=by.strip() or getpass.getuser(),
                reason=reason.strip() or "not given",
            )
        await ensure_topics(load_settings(), [subscription.agency], principal=Principal.OPERATOR)
        return version

    version = with_pool(add)
    console.print(
        f"{agency} now receives {event_type} ({', '.join(subscription.fields)}) on {basis} basis"
        f" (version {version})."
    )


def _utc(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


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
    console.print(f"{len(rows)} event(s). See one with `tuo status REFERENCE --reason …`.")


ReasonOption = Annotated[
    str, typer.Option(help="Why (kept with the new version, and published in the register).")
]
ByOption = Annotated[str, typer.Option(help="Who makes the change (recorded).")]


@subscriptions_app.command("suspend")
def subscriptions_suspend(
    agency: str,
    event_type: Annotated[str | None, typer.Argument(help="Default: all of the agency's")] = None,
    reason: ReasonOption = "",
    by: ByOption = "",
) -> None:
    """Stop routing to an agency from the next routing decision on."""
    _set_status(agency, event_type, "suspended", reason, by)


@subscriptions_app.command("activate")
def subscriptions_activate(
    agency: str,
    event_type: Annotated[str | None, typer.Argument(help="Default: all of the agency's")] = None,
    reason: ReasonOption = "",
    by: ByOption = "",
) -> None:
    """Resume routing to a suspended agency."""
    _set_status(agency, event_type, "active", reason, by)


def _set_status(agency: str, event_type: str | None, status: str, reason: str, by: str) -> None:
    changed = with_pool(
        lambda pool: set_subscription_status(
            pool, agency, event_type, status, by=by.strip() or getpass.getuser(), reason=reason.strip()
        )
    )
    if not changed:
        raise fail(f"{agency} has no subscription{' to ' + event_type if event_type else ''}")
    verb = "Suspended" if status == "suspended" else "Activated"
    console.print(f"{verb} {changed} subscription(s) of {agency}.")


# --- versions and agencies' requests ----------------------------------------------------------


def _terms_text(terms: versions.Terms) -> str:
    basis = terms.legal_basis + (f": {terms.statute}" if terms.statute else "")
    fields = ", ".join(sorted(terms.fields)) if terms.fields is not None else "(all)"
    parts = [basis, fields, terms.condition.describe(), _validity(terms.valid_from, terms.valid_to)]
    return "; ".join(parts) + ("" if terms.status == "active" else f" [{terms.status}]")


@subscriptions_app.command("history")
def subscriptions_history(
    agency: Annotated[str, typer.Argument(help="Agency code, e.g. dwp")],
    event_type: Annotated[str | None, typer.Argument(help="Default: all of the agency's")] = None,
) -> None:
    """Every version of an agency's subscriptions: its terms, in force from and to, who
    changed them, who approved, and why."""
    found = with_pool(lambda pool: versions.history(pool, agency, event_type))
    if not found:
        raise fail(f"{agency} has no subscription{' to ' + event_type if event_type else ''}")
    table = Table("version", "event type", "terms", "in force", "changed by", "why", caption="UTC")
    for v in found:
        by = v.changed_by + (f", approved by {v.approved_by}" if v.approved_by else "")
        table.add_row(
            str(v.id),
            v.event_type,
            _terms_text(v.terms),
            f"{v.in_force_from:%Y-%m-%d %H:%M:%S} to "
            + (f"{v.in_force_to:%Y-%m-%d %H:%M:%S}" if v.in_force_to else "now"),
            by,
            v.reason + (f" (request {v.change_id})" if v.change_id else ""),
        )
    console.print(table)


@subscriptions_app.command("changes")
def subscriptions_changes(
    every: Annotated[bool, typer.Option("--all", help="Decided ones too, not only those waiting.")] = False,
    agency: Annotated[str | None, typer.Option(help="Only this agency's.")] = None,
) -> None:
    """Agencies' requests to change their subscriptions: those waiting for approval."""
    found = with_pool(lambda pool: versions.changes(pool, agency=agency, pending_only=not every))
    if not found:
        console.print("No request is waiting for approval." if not every else "No request was made.")
        return
    table = Table("id", "agency", "event type", "asks for", "widens", "asked", "state", caption="UTC")
    for c in found:
        state = c.state + (f" by {c.decided_by}: {c.decision_reason}" if c.decided_by else "")
        table.add_row(
            str(c.id),
            c.agency,
            c.event_type,
            _terms_text(c.proposed),
            "; ".join(c.widens) or "-",
            f"{c.requested_at:%Y-%m-%d %H:%M} by {c.requested_by}: {c.reason}",
            state,
        )
    console.print(table)
    waiting = sum(c.state == "pending" for c in found)
    if waiting:
        console.print(f"{waiting} waiting. Decide with `tuo subscriptions approve|reject ID --reason …`.")


@subscriptions_app.command("approve")
def subscriptions_approve(
    change_id: Annotated[int, typer.Argument(help="The request's id (`tuo subscriptions changes`)")],
    reason: Annotated[
        str, typer.Option(help="Why it is approved (kept with the request; the agency sees it).")
    ],
    by: ByOption = "",
) -> None:
    """Put an agency's waiting request in force from now, as a new version."""
    change = _decide(versions.approve, change_id, reason, by)
    console.print(
        f"Approved: {change.agency}'s {change.event_type} subscription is version {change.version} from now."
    )


@subscriptions_app.command("reject")
def subscriptions_reject(
    change_id: Annotated[int, typer.Argument(help="The request's id (`tuo subscriptions changes`)")],
    reason: Annotated[str, typer.Option(help="Why it is rejected (the agency sees it).")],
    by: ByOption = "",
) -> None:
    """Refuse an agency's waiting request; its subscription stays as it is."""
    change = _decide(versions.reject, change_id, reason, by)
    console.print(f"Rejected: {change.agency}'s {change.event_type} subscription stays as it is.")


def _decide(how: versions.Decider, change_id: int, reason: str, by: str) -> versions.Change:
    try:
        return with_pool(lambda pool: how(pool, change_id, by=by.strip() or getpass.getuser(), reason=reason))
    except versions.ChangeRefused as exc:
        raise fail(str(exc)) from exc
