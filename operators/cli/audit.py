"""`tuo audit`: check the tamper-evident hash chains, of routing decisions and of looks at personal data."""

from __future__ import annotations

from typing import Annotated

import asyncpg
import typer

from operators.cli.shared import console, err, fail, with_pool
from router import audit, looks

audit_app = typer.Typer(help="The tamper-evident record of routing decisions.", no_args_is_help=True)


@audit_app.command("verify")
def audit_verify(
    schema: Annotated[str, typer.Option(help="PostgreSQL schema holding the chain.", hidden=True)] = "public",
) -> None:
    """Recompute the hash chains of routing decisions and of staff's looks at personal
    data; name every row altered, removed or inserted."""

    async def run(pool: asyncpg.Pool) -> list[tuple[str, int, list[audit.Finding]]]:
        async with pool.acquire() as conn:
            await conn.execute(f"SET search_path TO {_identifier(schema)}")
            return [
                ("routing decisions", *await audit.verify(conn)),
                ("looks at personal data", *await looks.verify(conn)),
            ]

    broken = False
    for what, checked, findings in with_pool(run):
        for finding in findings:
            err.print(f"[red]✗[/] {what}: {finding}")
        if findings:
            err.print(f"{len(findings)} problem(s) in {checked} {what}.")
            broken = True
        else:
            console.print(f"[green]✓[/] {checked} {what}; the chain is intact.")
    if broken:
        raise typer.Exit(code=1)


def _identifier(name: str) -> str:
    if not name.isidentifier():
        raise fail(f"{name!r} is not a schema name")
    return name
