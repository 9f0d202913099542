"""`tuo proxies`: people appointed to act for a citizen on the consent pages."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from citizens import proxies
from operators.cli.shared import command_settings, console, fail, with_pool

proxies_app = typer.Typer(
    help="People appointed to act for a citizen on the consent pages.", no_args_is_help=True
)


@proxies_app.command("appoint")
def proxies_appoint(
    name: Annotated[str, typer.Option(help="The name the proxy knows the person by (stored sealed)")],
    reason: Annotated[str, typer.Option(help="The authority, e.g. 'Lasting power of attorney LPA-123'")],
    recorded_by: Annotated[str, typer.Option(help="Who records the appointment")],
    agency: Annotated[
        list[str] | None, typer.Option(help="An agency it covers (repeat); none: every agency")
    ] = None,
    days: Annotated[int | None, typer.Option(min=1, help="Days until it ends; none: open-ended")] = None,
) -> None:
    """Appoint a proxy. Both National Insurance numbers are asked for, not taken as
    arguments (so they stay out of shell history), and only used to derive subject ids."""
    proxy_nino = typer.prompt("Proxy's National Insurance number", hide_input=True)
    subject_nino = typer.prompt("National Insurance number of the person they act for", hide_input=True)
    settings = command_settings()
    valid_to = None if days is None else datetime.now(UTC) + timedelta(days=days)
    try:
        appointment = with_pool(
            lambda pool: proxies.appoint_proxy_by_nino(
                pool,
                settings,
                proxy_nino=proxy_nino,
                subject_nino=subject_nino,
                subject_name=name,
                agencies=agency or None,
                recorded_by=recorded_by,
                reason=reason,
                valid_to=valid_to,
            )
        )
    except proxies.InvalidAppointment as bad:
        raise fail(str(bad)) from None
    console.print(
        f"Appointment {appointment} recorded; the proxy chooses it at /citizen/act-for/{appointment}."
    )


@proxies_app.command("end")
def proxies_end(appointment: str) -> None:
    """End an appointment now."""
    try:
        wanted = uuid.UUID(appointment)
    except ValueError:
        raise fail(f"{appointment!r} is not an appointment id") from None
    if not with_pool(lambda pool: proxies.end_appointment(pool, wanted)):
        raise fail(f"no running appointment {appointment}")
    console.print(f"Appointment {appointment} ended.")
