"""`tuo audit`: check the tamper-evident hash chain of routing decisions."""

from __future__ import annotations

from typing import Annotated

import asyncpg
import typer

from operators.cli.shared import console, err, fail, with_pool
from router import audit

audit_app = typer.Typer(help="The tamper-evident record of routing decisions.", no_args_is_help=True)


@audit_app.command("verify")
def audit_verify(
    schema: Annotated[str, typer.Option(help="PostgreSQL schema holding the chain.", hidden=True)] = "public",
) -> None:
    """Recompute the hash chain of routing decisions; name every row altered, removed or inserted."""

    async def run(pool: asyncpg.Pool) -> tuple[int, list[audit.Finding]]:
        async with pool.acquire() as conn:
            await conn.execute(f"SET search_path TO {_identifier(schema)}")
            return await audit.verify(conn)

    checked, findings = with_pool(run)
    if findings:
        for finding in findings:
            err.print(f"[red]✗[/] {finding}")
        err.print(f"{len(findings)} problem(s) in {checked} decisions.")
        raise typer.Exit(code=1)
    console.print(f"[green]✓[/] {checked} routing decisions; the chain is intact.")


def _identifier(name: str) -> str:
    if not name.isidentifier():
        raise fail(f"{name!r} is not a schema name")
    return name
