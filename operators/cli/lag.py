"""`tuo lag`: how far each consumer group is behind the topics it reads."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from operators import lag as consumer_lag
from operators.cli.dlq import dlq_call
from operators.cli.shared import command_settings, console


def lag_command(
    agency: Annotated[str | None, typer.Option(help="Only this agency's consumer group.")] = None,
) -> None:
    """Consumer-group lag: how far the router, the receipt tracker and each agency are
    behind what has been written to the topics they read."""
    settings = command_settings()
    groups = dlq_call(lambda pool: consumer_lag.consumer_lag(settings, pool, agency=agency))
    table = Table(
        "reader",
        "group",
        "state",
        "lag",
        "partitions (committed/end)",
        caption="Lag in offsets. On topics written in transactions each commit marker takes an offset: "
        "a group 1 short of the end there is caught up (not counted); a backlog counts its markers.",
    )
    for group in groups:
        style = {"caught up": "green", "behind": "yellow"}.get(group.state, "red")
        table.add_row(
            Text(group.reader.name),
            Text(group.reader.group),
            Text(group.state, style=style),
            str(group.pending),
            Text(
                ", ".join(
                    f"{p.topic}:{p.partition} {'-' if p.committed is None else p.committed}/{p.end}"
                    for p in group.partitions
                )
                or "none"
            ),
        )
    console.print(table)
