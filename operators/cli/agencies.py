"""`tuo agencies`: agencies' Kafka accounts (principal, ACLs, topics), onboarding and suspension,
and their OAuth2 clients for the HTTPS API."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated

import asyncpg
import typer
from rich.table import Table

from consumers import agency_api
from operators.cli.shared import command_settings, console, fail, with_pool
from router import interest
from runtime import access
from runtime.kafka_admin import KafkaAdminError

agencies_app = typer.Typer(
    help="Agencies' accounts on Kafka: principal, ACLs, topics; onboarding and suspension.",
    no_args_is_help=True,
)


SUBSCRIBABLE = ("BirthRegistered", "DeathRegistered", "AddressChanged")


@agencies_app.command("add")
def agencies_add(
    agency: Annotated[str, typer.Argument(help="Agency code, e.g. council-york")],
    event_type: Annotated[
        list[str] | None,
        typer.Option(help="An event type for its suspended subscription skeleton (repeat); default: all"),
    ] = None,
    by: Annotated[str, typer.Option(help="Who onboards it (recorded).")] = "",
    reinstate: Annotated[
        bool,
        typer.Option("--reinstate", help="An agency onboarded before: new password, suspension lifted."),
    ] = False,
) -> None:
    """Onboard an agency: its Kafka principal and password, ACLs (read only its own topic
    in its own group, write only its own receipts), topics, and a suspended subscription
    per event type for `tuo subscriptions add` to fill in."""
    settings = command_settings()
    unknown = sorted(set(event_type or []) - set(SUBSCRIBABLE))
    if unknown:
        raise fail(f"not an event type agencies subscribe to: {', '.join(unknown)}")

    async def onboard(pool: asyncpg.Pool) -> access.Onboarded:
        return await access.onboard_agency(
            settings,
            pool,
            agency,
            event_type or SUBSCRIBABLE,
            by=by.strip() or getpass.getuser(),
            reinstate=reinstate,
        )

    try:
        done = with_pool(onboard)
    except (access.NotAnAgencyName, access.AgencyExists, KafkaAdminError, access.NotInEffect) as exc:
        raise fail(str(exc)) from exc
    console.print(
        f"Onboarded {agency} as Kafka user [bold]{done.principal}[/] with {len(done.grants)} ACL rules:"
    )
    for grant in done.grants:
        console.print(f"  {grant}")
    if done.topics:
        console.print(f"Created topics: {', '.join(done.topics)}")
    if done.skeleton:
        console.print(f"Suspended subscriptions to fill in: {', '.join(done.skeleton)}")
    if done.stored:
        console.print(f"Its password is in {settings.kafka_credentials_file} (the local stack's).")
    else:
        # Shown once, never logged: hand it to the agency over a secure channel.
        console.print(f"Password (shown once; give it to the agency securely): {done.password}")


@agencies_app.command("suspend")
def agencies_suspend(
    agency: Annotated[str, typer.Argument(help="Agency code")],
    reason: Annotated[str, typer.Option(help="Why (recorded, 3-500 characters).")],
    by: Annotated[str, typer.Option(help="Who suspends it (recorded).")] = "",
) -> None:
    """Cut an agency off at once: remove its ACLs and password, and suspend its
    subscriptions. `tuo agencies add` gives it a new password again."""
    settings = command_settings()
    if not 3 <= len(reason.strip()) <= 500:
        raise fail("give a reason of 3 to 500 characters")

    async def suspend(pool: asyncpg.Pool) -> access.Suspended:
        return await access.suspend_agency(
            settings, pool, agency, reason=reason.strip(), by=by.strip() or getpass.getuser()
        )

    try:
        done = with_pool(suspend)
    except (access.NoSuchAgency, KafkaAdminError, access.NotInEffect) as exc:
        raise fail(str(exc)) from exc
    console.print(
        f"Suspended {agency}: {done.acls_removed} ACL rules removed, "
        f"password {'removed' if done.credential_removed else 'already absent'}, "
        f"{done.subscriptions_suspended} subscription(s) suspended."
    )


@agencies_app.command("list")
def agencies_list() -> None:
    """Agencies' accounts: status, who onboarded or suspended them, and when."""
    rows = with_pool(
        lambda pool: pool.fetch(
            "SELECT agency, principal, status, created_by, created_at, suspended_by, suspended_reason"
            " FROM agency_account ORDER BY agency"
        )
    )
    table = Table("agency", "Kafka user", "status", "onboarded", "suspended by", "reason")
    for row in rows:
        table.add_row(
            row["agency"],
            row["principal"],
            row["status"],
            f"{row['created_at']:%Y-%m-%d %H:%M} by {row['created_by']}",
            row["suspended_by"] or "-",
            row["suspended_reason"] or "-",
        )
    console.print(table)


@agencies_app.command("client")
def agencies_client(
    agency: Annotated[str, typer.Argument(help="Agency code")],
    scope: Annotated[
        list[str] | None,
        typer.Option(help=f"What its tokens may do (repeat): {', '.join(agency_api.SCOPES)}; default all."),
    ] = None,
    by: Annotated[str, typer.Option(help="Who makes it (recorded).")] = "",
) -> None:
    """An OAuth2 client for an agency's systems on HTTPS (receipts, its delivery feed, the
    people it registers): prints its id and secret, the secret once."""
    unknown = sorted(set(scope or []) - set(agency_api.SCOPES))
    if unknown:
        raise fail(f"not a scope: {', '.join(unknown)}; the scopes are {', '.join(agency_api.SCOPES)}")
    scopes = tuple(scope) if scope else agency_api.SCOPES
    try:
        made = with_pool(
            lambda pool: agency_api.create_client(
                pool, agency, by=by.strip() or getpass.getuser(), scopes=scopes
            )
        )
    except agency_api.NoSuchAgency as exc:
        raise fail(str(exc)) from exc
    console.print(f"Client id: {made.client_id} (scopes: {' '.join(sorted(scopes))})")
    # Shown once, never logged: hand it to the agency over a secure channel.
    console.print(f"Client secret (shown once; give it to the agency securely): {made.client_secret}")
    console.print("Tokens: POST /oauth/token with grant_type=client_credentials (HTTP Basic with these).")


@agencies_app.command("revoke-client")
def agencies_revoke_client(
    client_id: Annotated[str, typer.Argument(help="The client id `tuo agencies client` printed")],
    by: Annotated[str, typer.Option(help="Who revokes it (recorded).")] = "",
) -> None:
    """Stop an agency's OAuth2 client at once: its tokens stop working, it gets no new ones."""
    if not with_pool(
        lambda pool: agency_api.revoke_client(pool, client_id, by=by.strip() or getpass.getuser())
    ):
        raise fail(f"no live client {client_id!r}")
    console.print(f"Revoked {client_id}; its tokens no longer work.")


@agencies_app.command("interest")
def agencies_interest(
    agency: Annotated[str, typer.Argument(help="Agency code")],
    file: Annotated[
        Path,
        typer.Option(
            "--file",
            exists=True,
            dir_okay=False,
            help="A NINO per line (blank lines and # comments skipped).",
        ),
    ],
    withdraw: Annotated[bool, typer.Option("--withdraw", help="Withdraw these people instead.")] = False,
    by: Annotated[str, typer.Option(help="Who asks (recorded).")] = "",
) -> None:
    """Register the people an agency holds records for (or withdraw them): a subscription
    added with --registered-only then tells it only of them. The NINOs are turned into
    pseudonymous subject ids and not kept."""
    settings = command_settings()
    lines = [line.split("#", 1)[0].strip() for line in file.read_text(errors="replace").splitlines()]
    ninos = [line for line in lines if line]
    if not ninos:
        raise fail(f"{file} holds no NINOs")
    if len(ninos) > interest.MAX_PER_REQUEST * 10:
        raise fail(
            f"{file} holds {len(ninos):,} NINOs; give at most {interest.MAX_PER_REQUEST * 10:,} at a time"
        )
    try:
        subjects = interest.subject_ids(ninos, settings.require_pseudonym_key())
    except interest.NotANino as exc:
        raise fail(f"{file}: {exc}") from exc

    async def change(pool: asyncpg.Pool) -> tuple[interest.InterestChange, int]:
        if await pool.fetchval("SELECT status FROM agency_account WHERE agency = $1", agency) is None:
            raise fail(f"no agency {agency!r} is onboarded; see `tuo agencies add`")
        done = await interest.change_interest(
            pool,
            agency,
            register=[] if withdraw else subjects,
            withdraw=subjects if withdraw else [],
            by=by.strip() or getpass.getuser(),
        )
        return done, await interest.interest_count(pool, agency)

    done, now = with_pool(change)
    console.print(
        f"{agency}: {done.registered} registered, {done.withdrawn} withdrawn, {done.unchanged} unchanged;"
        f" {now} registered now."
    )
