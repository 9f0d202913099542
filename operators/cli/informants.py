"""`tuo informants`: what a register office does for an informant whose reference
(the journey at /tell-us-once, ``citizens.informants``) was locked by wrong answers."""

from __future__ import annotations

from typing import Annotated

import asyncpg
import structlog
import typer

from operators.cli.shared import console, fail, with_pool
from router.registrations import unlock_reference
from schemas.validation import as_printed

log = structlog.get_logger(__name__)

informants_app = typer.Typer(help="The informants' journey at /tell-us-once.", no_args_is_help=True)


@informants_app.command("unlock")
def unlock(
    reference: Annotated[str, typer.Argument(help="The reference, as on the registrar's letter.")],
    by: Annotated[str, typer.Option(help="Who vouched for the informant (for the log).")],
) -> None:
    """Let a locked reference be tried again, once the office has checked who is asking."""
    wanted = as_printed(reference)

    async def run(pool: asyncpg.Pool) -> bool:
        return await unlock_reference(pool, wanted)

    if not with_pool(run):
        raise fail(f"{wanted!r} is not locked (or is not a reference): nothing to unlock.")
    log.info("informant_reference_unlocked", reference=wanted, by=by[:100])
    console.print(f"[green]✓[/] {wanted} can be used again at /tell-us-once.")
