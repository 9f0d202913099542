"""`tuo offices`, `tuo users` and `tuo tokens`: registration offices and their signing keys,
the registrars who sign in to the forms, and the intake API's bearer tokens."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Annotated, TypeVar

import asyncpg
import typer
from rich.table import Table

from operators.cli.shared import command_settings, console, err, fail, with_pool
from producers import accounts
from producers.office_keys import create_key
from runtime.keyring import office_keys
from runtime.sealing import PayloadSealer

T = TypeVar("T")

offices_app = typer.Typer(help="Registration offices and their signing keys.", no_args_is_help=True)
users_app = typer.Typer(help="Registrars who sign in to the intake forms.", no_args_is_help=True)
tokens_app = typer.Typer(help="Bearer tokens for systems that use the intake API.", no_args_is_help=True)


RoleOption = Annotated[str, typer.Option(help="registrar, or supervisor (may also void events)")]


def _role(role: str) -> accounts.Role:
    if role not in accounts.ROLES:
        raise fail(f"role must be one of: {', '.join(accounts.ROLES)}")
    return role


TokenRoleOption = Annotated[
    str,
    typer.Option(help="registrar; supervisor (may also void events); or monitoring (may only read /metrics)"),
]


def _token_role(role: str) -> accounts.TokenRole:
    if role not in accounts.TOKEN_ROLES:
        raise fail(f"role must be one of: {', '.join(accounts.TOKEN_ROLES)}")
    return role


def _account_call(work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    try:
        return with_pool(work)
    except accounts.AccountError as exc:
        raise fail(str(exc)) from exc


@offices_app.command("add")
def offices_add(
    code: Annotated[str, typer.Argument(help="Short code, e.g. leeds")],
    name: Annotated[str, typer.Option(help="Full name, e.g. 'Leeds Register Office'")],
) -> None:
    """Add a registration office, with its first Ed25519 signing key."""
    key_id = _account_call(
        lambda pool: accounts.add_office(pool, code, name, PayloadSealer.from_settings(command_settings()))
    )
    console.print(f"Added office {code}; it signs events with key {key_id}.")


@offices_app.command("rotate-key")
def offices_rotate_key(code: str) -> None:
    """Give an office a new signing key; the old one stays published for events it signed."""

    async def rotate(pool: asyncpg.Pool) -> str:
        sealer = PayloadSealer.from_settings(command_settings())  # before anything changes
        if not await pool.fetchval("SELECT 1 FROM registration_office WHERE code = $1", code):
            raise accounts.AccountError(f"there is no office {code!r}")
        async with pool.acquire() as conn:
            return await create_key(conn, code, sealer)

    console.print(f"Office {code} now signs with key {_account_call(rotate)}.")


@offices_app.command("list")
def offices_list() -> None:
    """Offices and their signing keys (active and retired)."""
    keys = with_pool(office_keys)
    table = Table("office", "key id", "created", "retired")
    for key in keys:
        retired = key.retired_at.isoformat(timespec="seconds") if key.retired_at else "-"
        table.add_row(key.office, key.key_id, key.created_at.isoformat(timespec="seconds"), retired)
    console.print(table)


@users_app.command("add")
def users_add(
    username: Annotated[str, typer.Argument(help="Sign-in name, e.g. jo.bloggs")],
    office: Annotated[str, typer.Option(help="The office they register for")],
    name: Annotated[str, typer.Option(help="Their name as shown on pages")],
    role: RoleOption = "registrar",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input")
    ] = False,
) -> None:
    """Add a registrar; the password is asked for (never an argument: it would be in shell history)."""
    checked_role = _role(role)
    if password_stdin:
        password = typer.get_text_stream("stdin").readline().rstrip("\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        accounts.check_password_strength(password)
    except accounts.AccountError as exc:
        raise fail(str(exc)) from exc
    _account_call(lambda pool: accounts.add_registrar(pool, username, name, office, checked_role, password))
    console.print(f"Added {checked_role} {username} at {office}.")


@users_app.command("disable")
def users_disable(username: str) -> None:
    """Stop a registrar signing in (their records stay)."""
    result = with_pool(
        lambda pool: pool.execute(
            "UPDATE registrar SET disabled_at = now() WHERE username = $1 AND disabled_at IS NULL", username
        )
    )
    if result.endswith(" 0"):
        raise fail(f"no enabled user {username!r}")
    console.print(f"Disabled {username}.")


@tokens_app.command("issue")
def tokens_issue(
    office: Annotated[str, typer.Option(help="The office the token submits for")],
    label: Annotated[str, typer.Option(help="Who holds it, e.g. 'St James hospital system'")],
    role: TokenRoleOption = "registrar",
    days: Annotated[int, typer.Option(min=1, max=366, help="Days until it expires")] = 90,
) -> None:
    """Issue an API bearer token; it is printed once and only its hash is kept."""
    checked_role = _token_role(role)
    token = _account_call(
        lambda pool: accounts.issue_token(pool, office, checked_role, label, timedelta(days=days))
    )
    err.print(
        f"Token for {label} ({checked_role} at {office}), valid {days} days. It will not be shown again:"
    )
    print(token)


@tokens_app.command("revoke")
def tokens_revoke(label: str) -> None:
    """Revoke every current token with this label, at once."""
    count = with_pool(lambda pool: accounts.revoke_tokens(pool, label))
    if not count:
        raise fail(f"no current token labelled {label!r}")
    console.print(f"Revoked {count} token(s) labelled {label}.")
