"""`tuo webhooks`: agencies told by webhook: their endpoints, secrets and delivery log."""

from __future__ import annotations

import getpass
from datetime import timedelta
from typing import Annotated

import asyncpg
import typer
from rich.table import Table

from consumers.webhooks import endpoints
from consumers.webhooks.requests import FORMATS
from operators.cli.shared import AgencyArg, command_settings, console, fail, when, with_pool
from runtime.sealing import PayloadSealer

webhooks_app = typer.Typer(
    help="Agencies told by webhook: endpoints, signing secrets, the delivery log.", no_args_is_help=True
)


def _by(by: str) -> str:
    return by.strip() or getpass.getuser()


@webhooks_app.command("set")
def webhooks_set(
    agency: AgencyArg,
    url: Annotated[str, typer.Argument(help="The agency's HTTPS endpoint, e.g. https://council.example/tuo")],
    payload_format: Annotated[
        str, typer.Option("--format", help=f"Body format: {' or '.join(FORMATS)}.")
    ] = "avro",
    in_flight: Annotated[
        int, typer.Option(min=1, max=64, help="Deliveries in flight to it at once, at most.")
    ] = endpoints.DEFAULT_IN_FLIGHT,
    retry_hours: Annotated[
        float, typer.Option(min=0.01, max=720, help="How long to keep trying one event before giving up.")
    ] = endpoints.DEFAULT_RETRY_WINDOW.total_seconds() / 3600,
    by: Annotated[str, typer.Option(help="Who sets it (recorded).")] = "",
) -> None:
    """Tell an agency its events by webhook instead of its own Kafka consumer (the bus
    runs one for it from its next start). The first time, prints the signing secret once."""
    settings = command_settings()
    if payload_format not in FORMATS:
        raise fail(f"--format must be {' or '.join(FORMATS)}, not {payload_format!r}")

    async def set_it(pool: asyncpg.Pool) -> str | None:
        return await endpoints.set_endpoint(
            pool,
            PayloadSealer.from_settings(settings),
            agency,
            url,
            by=_by(by),
            payload_format=payload_format,
            max_in_flight=in_flight,
            retry_window=timedelta(hours=retry_hours),
        )

    try:
        secret = with_pool(set_it)
    except (endpoints.NotAWebhookUrl, LookupError) as exc:
        raise fail(str(exc)) from exc
    console.print(f"{agency} is told by webhook at {url.strip()} ({payload_format}).")
    if secret is not None:
        # Shown once, never logged: hand it to the agency over a secure channel.
        console.print(f"Signing secret (shown once; give it to the agency securely): {secret}")


@webhooks_app.command("rotate-secret")
def webhooks_rotate_secret(
    agency: AgencyArg,
    overlap_hours: Annotated[
        float, typer.Option(min=0, max=720, help="How long the old secret is still signed with.")
    ] = endpoints.ROTATION_OVERLAP.total_seconds() / 3600,
    by: Annotated[str, typer.Option(help="Who rotates it (recorded).")] = "",
) -> None:
    """A new signing secret; requests carry signatures with both until the old one expires."""
    settings = command_settings()

    async def rotate(pool: asyncpg.Pool) -> str:
        return await endpoints.rotate_secret(
            pool,
            PayloadSealer.from_settings(settings),
            agency,
            by=_by(by),
            overlap=timedelta(hours=overlap_hours),
        )

    try:
        secret = with_pool(rotate)
    except endpoints.NoWebhookEndpoint as exc:
        raise fail(str(exc)) from exc
    console.print(f"New signing secret (shown once; give it to the agency securely): {secret}")
    console.print(f"The previous one is signed with for {timedelta(hours=overlap_hours)} more.")


@webhooks_app.command("list")
def webhooks_list() -> None:
    """Every webhook agency: endpoint, deliveries waiting, delivered, given up on."""
    rows = with_pool(endpoints.summary)
    if not rows:
        console.print("No agency is told by webhook. Set one with `tuo webhooks set AGENCY URL`.")
        return
    table = Table(
        "agency", "endpoint", "format", "waiting", "delivered", "given up", "last attempt", caption="UTC"
    )
    for r in rows:
        table.add_row(
            r["agency"],
            r["url"],
            r["payload_format"],
            str(r["pending"]),
            str(r["delivered"]),
            str(r["dead"]),
            when(r["last_attempt"].isoformat() if r["last_attempt"] else None),
        )
    console.print(table)


@webhooks_app.command("log")
def webhooks_log(
    agency: AgencyArg,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="How many attempts, newest first.")] = 50,
) -> None:
    """Every attempt to deliver to an agency's endpoint: when, what it answered, how long it took."""
    rows = with_pool(lambda pool: endpoints.attempts(pool, agency, limit))
    if not rows:
        console.print(f"No webhook attempts to {agency}.")
        return
    table = Table(
        "started at", "reference", "event", "attempt", "answer", "ms", "delivery", title=agency, caption="UTC"
    )
    for r in rows:
        answer = str(r["status_code"]) if r["status_code"] is not None else ""
        if r["error"] and r["status_code"] is None:
            answer = r["error"]
        table.add_row(
            when(r["started_at"].isoformat()),
            r["reference"] or "-",
            str(r["event_id"]),
            str(r["attempt"]),
            answer,
            str(r["latency_ms"]),
            {"pending": "retrying", "delivered": "delivered", "dead": "given up"}[r["delivery"]],
        )
    console.print(table)
