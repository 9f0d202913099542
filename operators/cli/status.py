"""`tuo status`: one event's routing decisions and receipts, agency by agency."""

from __future__ import annotations

import asyncio
import getpass
import uuid
from typing import Annotated, Any

import typer
from rich.table import Table

from consumers.webhooks import endpoints as webhooks
from operators.cli.shared import clear_errors, command_settings, console, fail, when
from router import looks
from router.store import event_status
from runtime.database import open_pool


def status_command(
    reference: str,
    reason: Annotated[
        str, typer.Option(help="Why you look (3-500 characters): recorded, and shown to the person.")
    ],
    by: Annotated[str, typer.Option(help="Who looks (recorded).")] = "",
) -> None:
    """Show, per agency, whether an event was delivered and what the agency's receipt says.
    The look is recorded first, with who and why, and the person sees it (router.looks)."""

    async def lookup() -> tuple[dict[str, Any] | None, list[Any]]:
        pool = await open_pool(command_settings())
        try:
            found = await event_status(pool, reference.strip().upper())
            if found is None:
                return None, []
            subject = await pool.fetchval(
                "SELECT subject_id FROM intake_record WHERE event_id = $1", uuid.UUID(found["event_id"])
            )
            await looks.record_look(
                pool,
                who=by.strip() or getpass.getuser(),
                role="operator",
                action=looks.Action.STATUS,
                reason=reason,
                subject_ids=[subject],
                event_ids=[found["event_id"]],
            )
            hooks = await webhooks.deliveries_of(pool, found["event_id"])
            return found, hooks
        finally:
            await pool.close()

    with clear_errors():
        try:
            found, hooks = asyncio.run(lookup())
        except looks.LookRefused as exc:
            raise fail(str(exc)) from exc
    if found is None:
        raise fail(f"no event has reference {reference}")
    print_event_status(found)
    for hook in hooks:
        console.print(f"Webhook to {hook['agency']}: {_webhook_label(hook)}")


def _webhook_label(hook: Any) -> str:
    """Where one webhook delivery has got to: delivered, retrying (when next), or given up."""
    tries = f"{hook['attempts']} attempt{'s' if hook['attempts'] != 1 else ''}"
    last = f", last answer {hook['last_answer']}" if hook["last_answer"] else ""
    if hook["status"] == "delivered":
        return f"delivered {when(hook['finished_at'].isoformat())} after {tries}"
    if hook["status"] == "dead":
        return f"given up {when(hook['finished_at'].isoformat())} after {tries}{last} (see `tuo dlq`)"
    return f"retrying, next attempt {when(hook['next_attempt_at'].isoformat())} ({tries}{last})"


DECISION_LABELS = {
    "delivered": "delivered",
    "withheld_no_consent": "withheld: no consent",
    "withheld_no_subscription": "not subscribed",
    "withheld_area_unknown": "withheld: area unknown",
    "withheld_not_of_interest": "withheld: not of interest",
    "blocked": "blocked by policy",
}


def print_event_status(found: dict[str, Any]) -> None:
    table = Table(
        title=f"{found['reference']} · {found['event_type']} · event {found['event_id']}",
        title_justify="left",
        caption="Times are UTC.",
        caption_justify="left",
    )
    for column in ("agency", "decision", "basis", "delivered at", "received at", "receipt"):
        table.add_column(column, no_wrap=True)
    table.add_column("reason")
    for row in found["agencies"]:
        table.add_row(
            row["agency"],
            DECISION_LABELS.get(row["decision"], row["decision"]),
            (row["legal_basis"] or "-").split(":")[0],
            when(row["delivered_at"]),
            when(row["received_at"]),
            _receipt_label(row),
            (row["receipt"] or {}).get("reason") or "",
        )
    console.print(table)


def _receipt_label(row: dict[str, Any]) -> str:
    """applied/rejected (at when), received, awaiting or overdue, with any repeats."""
    if row["decision"] != "delivered":
        return "-"
    receipt = row["receipt"]
    label = "awaiting" if receipt is None else receipt["outcome"]
    if receipt is not None and receipt["outcome"] in ("applied", "rejected"):
        label += f" {when(receipt['issued_at'])}"
    if row["overdue"]:
        label = f"OVERDUE (due {when(row['receipt_due_at'])}), {label}"
    extras = [
        f"{count} {what}"
        for count, what in (
            (row["redeliveries"], "redelivered"),
            (row["replays"], "replayed"),
            (row["duplicates"], "duplicate"),
        )
        if count
    ]
    return label + (f" [{', '.join(extras)}]" if extras else "")
