"""`tuo status`: one event's routing decisions and receipts, agency by agency."""

from __future__ import annotations

import asyncio
from typing import Any

from rich.table import Table

from operators.cli.shared import clear_errors, command_settings, console, fail, when
from router.store import event_status
from runtime.database import open_pool


def status_command(reference: str) -> None:
    """Show, per agency, whether an event was delivered and what the agency's receipt says."""

    async def lookup() -> dict[str, Any] | None:
        pool = await open_pool(command_settings())
        try:
            return await event_status(pool, reference.strip().upper())
        finally:
            await pool.close()

    with clear_errors():
        found = asyncio.run(lookup())
    if found is None:
        raise fail(f"no event has reference {reference}")
    print_event_status(found)


DECISION_LABELS = {
    "delivered": "delivered",
    "withheld_no_consent": "withheld: no consent",
    "withheld_no_subscription": "not subscribed",
    "withheld_area_unknown": "withheld: area unknown",
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
