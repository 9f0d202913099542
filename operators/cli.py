"""The ``tuo`` command line: the local stack, the bus's services, status, and the demo."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import asyncpg
import httpx
import typer
from aiokafka.errors import KafkaError
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from citizens import proxies
from devstack import LocalStack, StackError
from devstack.demo import demo_submissions, seed_agency_records, seed_demo_registrar, seed_offices
from operators import dead_letters as dlq
from operators import lag as consumer_lag
from operators import redelivery, replay
from operators.services import COMPONENTS, at_startup, start_bus
from producers import accounts
from producers.office_keys import create_key, published_keys
from router import audit, tracker
from router.seed import load_seed
from router.store import (
    area_unknown_decisions,
    event_status,
    list_subscriptions,
    set_subscription_status,
    upsert_subscription,
)
from router.subscription_request import SubscriptionRequest
from runtime import access, kafka
from runtime.access import Principal
from runtime.database import migrate, open_pool
from runtime.kafka import Topics, ensure_topics
from runtime.kafka_admin import KafkaAdminError, describe_acls
from runtime.logging import configure_logging
from runtime.sealing import PayloadSealer
from runtime.settings import MissingSetting, Settings, load_settings
from schemas import evolution
from schemas.catalogue import MINIMISED, SOURCE_DIR, VERSIONS_DIR, SchemaCatalogue
from schemas.fieldpaths import grantable_paths
from schemas.validation import today_in_the_uk

T = TypeVar("T")
app = typer.Typer(help="Tell Us Once: tell the state about a life event once.", no_args_is_help=True)
stack_app = typer.Typer(help="The local stack: Kafka and PostgreSQL on loopback.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
subscriptions_app = typer.Typer(help="Which agencies receive which events and fields.", no_args_is_help=True)
app.add_typer(subscriptions_app, name="subscriptions")
audit_app = typer.Typer(help="The tamper-evident record of routing decisions.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
schemas_app = typer.Typer(help="The event contract: Avro schemas, versions and ids.", no_args_is_help=True)
app.add_typer(schemas_app, name="schemas")
offices_app = typer.Typer(help="Registration offices and their signing keys.", no_args_is_help=True)
app.add_typer(offices_app, name="offices")
users_app = typer.Typer(help="Registrars who sign in to the intake forms.", no_args_is_help=True)
app.add_typer(users_app, name="users")
tokens_app = typer.Typer(help="Bearer tokens for systems that use the intake API.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
receipts_app = typer.Typer(
    help="Agencies' receipts: deadlines, overdue deliveries, redelivery.", no_args_is_help=True
)
app.add_typer(receipts_app, name="receipts")
agencies_app = typer.Typer(
    help="Agencies' accounts on Kafka: principal, ACLs, topics; onboarding and suspension.",
    no_args_is_help=True,
)
app.add_typer(agencies_app, name="agencies")
proxies_app = typer.Typer(
    help="People appointed to act for a citizen on the consent pages.", no_args_is_help=True
)
app.add_typer(proxies_app, name="proxies")
access_app = typer.Typer(help="Kafka ACLs of the bus's components.", no_args_is_help=True)
app.add_typer(access_app, name="access")
console = Console()
err = Console(stderr=True)


def _settings() -> Settings:
    settings = load_settings()
    configure_logging(settings)
    return settings


def _stack(settings: Settings, brokers: int | None = None) -> LocalStack:
    return LocalStack(
        settings.state_dir,
        settings.cache_dir,
        settings.kafka_version,
        settings.kafka_heap,
        settings.topic_prefix,
        brokers=brokers,
    )


class DemoRefused(RuntimeError):
    """The intake service refused one of the demo's own events."""


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]Error:[/] {message}")
    return typer.Exit(code=1)


@stack_app.command("up")
def stack_up(
    brokers: Annotated[
        int | None,
        typer.Option(
            "--brokers",
            help="Kafka brokers for a new stack: 1, or 3 (replication factor 3, min ISR 2, "
            "a three-voter controller quorum). Default: 1, or what an existing stack has.",
        ),
    ] = None,
) -> None:
    """Start Kafka and PostgreSQL (downloading Kafka's jars once), migrate the database
    and load the demo subscriptions."""
    settings = _settings()
    with console.status("Starting the local stack…"):
        try:
            times = _stack(settings, brokers).up()
        except StackError as exc:
            raise _fail(str(exc)) from exc
        asyncio.run(_prepare(load_settings()))
    console.print(
        f"Stack up: jars {times.jars_seconds:.1f}s, PostgreSQL {times.postgres_seconds:.1f}s, "
        f"Kafka {times.kafka_seconds:.1f}s"
    )
    _print_stack_status(settings)


@stack_app.command("down")
def stack_down() -> None:
    """Stop Kafka and PostgreSQL; their data stays on disk."""
    settings = _settings()
    _stack(settings).down()
    console.print("Stack stopped; data kept in " + str(settings.state_dir))


@stack_app.command("purge")
def stack_purge(
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Stop the stack and delete all its data (the downloaded jars are kept)."""
    settings = _settings()
    if not yes and not typer.confirm(f"Delete all data in {settings.state_dir}?"):
        raise typer.Exit(code=1)
    _stack(settings).purge()
    console.print("Stack purged.")


@stack_app.command("status")
def stack_status() -> None:
    """Show whether Kafka and PostgreSQL are running, and where."""
    _print_stack_status(_settings())


def _print_stack_status(settings: Settings) -> None:
    status = _stack(settings).status()
    table = Table("component", "state", "address")
    table.add_row("Kafka", _running(status.kafka_running), status.bootstrap_servers or "-")
    table.add_row("PostgreSQL", _running(status.postgres_running), status.database or "-")
    console.print(table)
    console.print(f"State directory: {status.state_dir}")


def _running(flag: bool) -> str:
    return "[green]running[/]" if flag else "[yellow]stopped[/]"


async def _prepare(settings: Settings, seed: bool = True) -> None:
    pool = await open_pool(settings)
    try:
        await migrate(pool, settings)
        if seed:
            await load_seed(pool)
            await seed_offices(pool, PayloadSealer.from_settings(settings))
            await access.onboard_subscribed_agencies(settings, pool, by="tuo seed")
    finally:
        await pool.close()


@contextlib.contextmanager
def _clear_errors() -> Iterator[None]:
    """Turn configuration and connection failures into one-line messages."""
    try:
        yield
    except MissingSetting as exc:
        raise _fail(str(exc)) from exc
    except (OSError, asyncpg.PostgresError) as exc:
        raise _fail(f"cannot use PostgreSQL: {exc}") from exc
    except KafkaError as exc:
        raise _fail(f"cannot use Kafka: {exc}") from exc


SourceDir = Annotated[Path, typer.Option(help="Schema sources (named types).", hidden=True)]
VersionsDir = Annotated[Path, typer.Option(help="Released versions and catalogue.json.", hidden=True)]


@schemas_app.command("check")
def schemas_check(source_dir: SourceDir = SOURCE_DIR, versions_dir: VersionsDir = VERSIONS_DIR) -> None:
    """Prove every version of every schema FULL_TRANSITIVE compatible with all earlier
    versions, every enum has a default, and no source changed without a release."""
    problems = evolution.check(source_dir, versions_dir)
    if problems:
        for problem in problems:
            err.print(f"[red]✗[/] {problem}")
        raise typer.Exit(code=1)
    catalogue = SchemaCatalogue(versions_dir)
    total = sum(len(catalogue.versions(n)) for n in catalogue.names())
    console.print(
        f"[green]✓[/] {len(catalogue.names())} schemas, {total} versions: FULL_TRANSITIVE compatible, "
        "enums have defaults, sources match their latest release."
    )


@schemas_app.command("freeze")
def schemas_freeze(source_dir: SourceDir = SOURCE_DIR, versions_dir: VersionsDir = VERSIONS_DIR) -> None:
    """Release a new version (with a new, permanent id) of each schema whose source
    changed, if every version stays compatible; otherwise release nothing."""
    outcome = evolution.release(source_dir, versions_dir)
    if outcome.problems:
        for problem in outcome.problems:
            err.print(f"[red]✗[/] {problem}")
        err.print("Nothing released: fix the schemas above (add defaults, keep types) and try again.")
        raise typer.Exit(code=1)
    for line in outcome.released:
        console.print(f"released {line}")
    if not outcome.released:
        console.print("Nothing changed; no new versions.")


@schemas_app.command("list")
def schemas_list(versions_dir: VersionsDir = VERSIONS_DIR) -> None:
    """Every released schema version with its wire id."""
    table = Table("id", "subject", "version")
    for entry in SchemaCatalogue(versions_dir).entries():
        table.add_row(str(entry.schema_id), entry.subject, str(entry.version))
    console.print(table)


def _with_pool(work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    async def run() -> T:
        pool = await open_pool(_settings())
        try:
            return await work(pool)
        finally:
            await pool.close()

    with _clear_errors():
        return asyncio.run(run())


@access_app.command("grant")
def access_grant() -> None:
    """Give each component (relay, router, tracker, operators' tooling) its ACLs for
    TUO_TOPIC_PREFIX. Run once per cluster, as a user allowed to alter the cluster;
    the local stack does it itself."""
    settings = _settings()
    try:
        with _clear_errors():
            asyncio.run(access.grant_components(settings))
    except (KafkaAdminError, access.NotInEffect) as exc:
        raise _fail(str(exc)) from exc
    for component in Principal:
        rules = access.component_grants(component, settings.topic_prefix)
        console.print(f"{component}: {len(rules)} ACL rules")


@access_app.command("show")
def access_show(
    user: Annotated[str | None, typer.Argument(help="A Kafka user, e.g. agency-hmrc; default: all")] = None,
) -> None:
    """The ACL rules the cluster holds."""
    settings = _settings()

    async def show() -> list[str]:
        client = kafka.admin(settings, principal=Principal.OPERATOR)
        await client.start()
        try:
            return [str(b) for b in await describe_acls(client, f"User:{user}" if user else None)]
        finally:
            await client.close()

    try:
        with _clear_errors():
            rules = asyncio.run(show())
    except KafkaAdminError as exc:
        raise _fail(str(exc)) from exc
    for rule in rules:
        console.print(rule)
    if not rules:
        console.print("No ACL rules" + (f" for {user}." if user else "."))


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
    settings = _settings()
    valid_to = None if days is None else datetime.now(UTC) + timedelta(days=days)
    try:
        appointment = _with_pool(
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
        raise _fail(str(bad)) from None
    console.print(
        f"Appointment {appointment} recorded; the proxy chooses it at /citizen/act-for/{appointment}."
    )


@proxies_app.command("end")
def proxies_end(appointment: str) -> None:
    """End an appointment now."""
    try:
        wanted = uuid.UUID(appointment)
    except ValueError:
        raise _fail(f"{appointment!r} is not an appointment id") from None
    if not _with_pool(lambda pool: proxies.end_appointment(pool, wanted)):
        raise _fail(f"no running appointment {appointment}")
    console.print(f"Appointment {appointment} ended.")


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
    settings = _settings()
    unknown = sorted(set(event_type or []) - set(SUBSCRIBABLE))
    if unknown:
        raise _fail(f"not an event type agencies subscribe to: {', '.join(unknown)}")

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
        done = _with_pool(onboard)
    except (access.NotAnAgencyName, access.AgencyExists, KafkaAdminError, access.NotInEffect) as exc:
        raise _fail(str(exc)) from exc
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
    settings = _settings()
    if not 3 <= len(reason.strip()) <= 500:
        raise _fail("give a reason of 3 to 500 characters")

    async def suspend(pool: asyncpg.Pool) -> access.Suspended:
        return await access.suspend_agency(
            settings, pool, agency, reason=reason.strip(), by=by.strip() or getpass.getuser()
        )

    try:
        done = _with_pool(suspend)
    except (access.NoSuchAgency, KafkaAdminError, access.NotInEffect) as exc:
        raise _fail(str(exc)) from exc
    console.print(
        f"Suspended {agency}: {done.acls_removed} ACL rules removed, "
        f"password {'removed' if done.credential_removed else 'already absent'}, "
        f"{done.subscriptions_suspended} subscription(s) suspended."
    )


@agencies_app.command("list")
def agencies_list() -> None:
    """Agencies' accounts: status, who onboarded or suspended them, and when."""
    rows = _with_pool(
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


@subscriptions_app.command("list")
def subscriptions_list() -> None:
    """Every subscription: agency, event type, legal basis, fields, condition, status."""
    rows = _with_pool(list_subscriptions)
    table = Table("agency", "event type", "basis", "fields", "condition", "status")
    for row in rows:
        basis = row["legal_basis"] + (f": {row['statute']}" if row["statute"] else "")
        fields = ", ".join(row["fields"]) if row["fields"] is not None else "(all)"
        table.add_row(row["agency"], row["event_type"], basis, fields, row["condition"] or "-", row["status"])
    console.print(table)


@subscriptions_app.command("paths")
def subscriptions_paths(event_type: Annotated[str, typer.Argument(help="e.g. DeathRegistered")]) -> None:
    """The field paths a subscription to an event type can grant, one by one."""
    if event_type not in MINIMISED:
        raise _fail(f"{event_type!r} is not an event type agencies subscribe to: {', '.join(MINIMISED)}")
    for path in sorted(grantable_paths(event_type)):
        console.print(path)


@subscriptions_app.command("add")
def subscriptions_add(
    agency: Annotated[str, typer.Argument(help="Agency code, e.g. council-york")],
    event_type: Annotated[str, typer.Argument(help="e.g. DeathRegistered")],
    basis: Annotated[str, typer.Option(help="statutory or consent")],
    field: Annotated[
        list[str],
        typer.Option(help="A field path the agency receives (repeat), see `tuo subscriptions paths`"),
    ],
    statute: Annotated[str | None, typer.Option(help="The statute, for a statutory basis")] = None,
    local_authority: Annotated[
        list[str] | None,
        typer.Option(
            help="Only events whose subject lives or lived in this local authority (GSS code, repeat),"
            " e.g. E06000014 for York"
        ),
    ] = None,
) -> None:
    """Add or replace an agency's subscription to an event type (active at once)."""
    try:
        subscription = SubscriptionRequest(
            agency=agency,
            event_type=event_type,
            basis=basis,
            statute=statute,
            fields=field,
            local_authorities=local_authority or [],
        )
    except ValidationError as exc:
        raise _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from exc

    async def add(pool: asyncpg.Pool) -> None:
        await upsert_subscription(pool, **subscription.as_row())
        await ensure_topics(load_settings(), [subscription.agency], principal=Principal.OPERATOR)

    _with_pool(add)
    console.print(f"{agency} now receives {event_type} ({', '.join(subscription.fields)}) on {basis} basis.")


@subscriptions_app.command("area-unknown")
def subscriptions_area_unknown(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many, newest first.")] = 200,
) -> None:
    """Events withheld from councils because their postcode is not in the ONS Postcode
    Directory (no local authority): check and correct the postcode, or replay the event."""
    rows = _with_pool(lambda pool: area_unknown_decisions(pool, limit))
    if not rows:
        console.print("No event was withheld for an unknown area.")
        return
    table = Table("reference", "event type", "decided at", "councils not told", caption="UTC")
    for r in rows:
        table.add_row(r.reference, r.event_type, _when(r.decided_at.isoformat()), ", ".join(r.agencies))
    console.print(table)
    console.print(f"{len(rows)} event(s). See one with `tuo status REFERENCE`.")


@subscriptions_app.command("suspend")
def subscriptions_suspend(
    agency: str, event_type: Annotated[str | None, typer.Argument(help="Default: all of the agency's")] = None
) -> None:
    """Stop routing to an agency from the next routing decision on."""
    _set_status(agency, event_type, "suspended")


@subscriptions_app.command("activate")
def subscriptions_activate(
    agency: str, event_type: Annotated[str | None, typer.Argument(help="Default: all of the agency's")] = None
) -> None:
    """Resume routing to a suspended agency."""
    _set_status(agency, event_type, "active")


def _set_status(agency: str, event_type: str | None, status: str) -> None:
    changed = _with_pool(lambda pool: set_subscription_status(pool, agency, event_type, status))
    if not changed:
        raise _fail(f"{agency} has no subscription{' to ' + event_type if event_type else ''}")
    verb = "Suspended" if status == "suspended" else "Activated"
    console.print(f"{verb} {changed} subscription(s) of {agency}.")


RoleOption = Annotated[str, typer.Option(help="registrar, or supervisor (may also void events)")]


def _role(role: str) -> accounts.Role:
    if role not in accounts.ROLES:
        raise _fail(f"role must be one of: {', '.join(accounts.ROLES)}")
    return role


TokenRoleOption = Annotated[
    str,
    typer.Option(help="registrar; supervisor (may also void events); or monitoring (may only read /metrics)"),
]


def _token_role(role: str) -> accounts.TokenRole:
    if role not in accounts.TOKEN_ROLES:
        raise _fail(f"role must be one of: {', '.join(accounts.TOKEN_ROLES)}")
    return role


def _account_call(work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    try:
        return _with_pool(work)
    except accounts.AccountError as exc:
        raise _fail(str(exc)) from exc


@offices_app.command("add")
def offices_add(
    code: Annotated[str, typer.Argument(help="Short code, e.g. leeds")],
    name: Annotated[str, typer.Option(help="Full name, e.g. 'Leeds Register Office'")],
) -> None:
    """Add a registration office, with its first Ed25519 signing key."""
    key_id = _account_call(
        lambda pool: accounts.add_office(pool, code, name, PayloadSealer.from_settings(_settings()))
    )
    console.print(f"Added office {code}; it signs events with key {key_id}.")


@offices_app.command("rotate-key")
def offices_rotate_key(code: str) -> None:
    """Give an office a new signing key; the old one stays published for events it signed."""

    async def rotate(pool: asyncpg.Pool) -> str:
        sealer = PayloadSealer.from_settings(_settings())  # before anything changes
        if not await pool.fetchval("SELECT 1 FROM registration_office WHERE code = $1", code):
            raise accounts.AccountError(f"there is no office {code!r}")
        async with pool.acquire() as conn:
            return await create_key(conn, code, sealer)

    console.print(f"Office {code} now signs with key {_account_call(rotate)}.")


@offices_app.command("list")
def offices_list() -> None:
    """Offices and their signing keys (active and retired)."""
    keys = _with_pool(published_keys)
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
        raise _fail(str(exc)) from exc
    _account_call(lambda pool: accounts.add_registrar(pool, username, name, office, checked_role, password))
    console.print(f"Added {checked_role} {username} at {office}.")


@users_app.command("disable")
def users_disable(username: str) -> None:
    """Stop a registrar signing in (their records stay)."""
    result = _with_pool(
        lambda pool: pool.execute(
            "UPDATE registrar SET disabled_at = now() WHERE username = $1 AND disabled_at IS NULL", username
        )
    )
    if result.endswith(" 0"):
        raise _fail(f"no enabled user {username!r}")
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
    count = _with_pool(lambda pool: accounts.revoke_tokens(pool, label))
    if not count:
        raise _fail(f"no current token labelled {label!r}")
    console.print(f"Revoked {count} token(s) labelled {label}.")


@audit_app.command("verify")
def audit_verify(
    schema: Annotated[str, typer.Option(help="PostgreSQL schema holding the chain.", hidden=True)] = "public",
) -> None:
    """Recompute the hash chain of routing decisions; name every row altered, removed or inserted."""

    async def run(pool: asyncpg.Pool) -> tuple[int, list[audit.Finding]]:
        async with pool.acquire() as conn:
            await conn.execute(f"SET search_path TO {_identifier(schema)}")
            return await audit.verify(conn)

    checked, findings = _with_pool(run)
    if findings:
        for finding in findings:
            err.print(f"[red]✗[/] {finding}")
        err.print(f"{len(findings)} problem(s) in {checked} decisions.")
        raise typer.Exit(code=1)
    console.print(f"[green]✓[/] {checked} routing decisions; the chain is intact.")


def _identifier(name: str) -> str:
    if not name.isidentifier():
        raise _fail(f"{name!r} is not a schema name")
    return name


@app.command("migrate")
def migrate_command() -> None:
    """Apply pending database migrations."""
    with _clear_errors():
        asyncio.run(_prepare(_settings(), seed=False))
    console.print("Database up to date.")


@app.command("seed")
def seed_command() -> None:
    """Load the demo agencies' subscriptions (for the local stack, not production)."""
    with _clear_errors():
        asyncio.run(_prepare(_settings(), seed=True))
    console.print("Demo subscriptions loaded.")


@app.command("run")
def run_command(
    components: Annotated[
        list[str] | None,
        typer.Argument(help=f"Which components to run (default all): {', '.join(COMPONENTS)}"),
    ] = None,
) -> None:
    """Run the bus's services until Ctrl-C."""
    chosen = components or list(COMPONENTS)
    unknown = sorted(set(chosen) - set(COMPONENTS))
    if unknown:
        raise _fail(f"unknown component {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}")
    with _clear_errors():
        asyncio.run(_run(_settings(), chosen, demo=False))


@app.command("status")
def status_command(reference: str) -> None:
    """Show, per agency, whether an event was delivered and what the agency's receipt says."""

    async def lookup() -> dict[str, Any] | None:
        pool = await open_pool(_settings())
        try:
            return await event_status(pool, reference.strip().upper())
        finally:
            await pool.close()

    with _clear_errors():
        found = asyncio.run(lookup())
    if found is None:
        raise _fail(f"no event has reference {reference}")
    _print_event_status(found)


DECISION_LABELS = {
    "delivered": "delivered",
    "withheld_no_consent": "withheld: no consent",
    "withheld_no_subscription": "not subscribed",
    "withheld_area_unknown": "withheld: area unknown",
    "blocked": "blocked by policy",
}


def _print_event_status(found: dict[str, Any]) -> None:
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
            _when(row["delivered_at"]),
            _when(row["received_at"]),
            _receipt_label(row),
            (row["receipt"] or {}).get("reason") or "",
        )
    console.print(table)


def _when(moment: str | None) -> str:
    return moment[:19].replace("T", " ") if moment else "-"


def _receipt_label(row: dict[str, Any]) -> str:
    """applied/rejected (at when), received, awaiting or overdue, with any repeats."""
    if row["decision"] != "delivered":
        return "-"
    receipt = row["receipt"]
    label = "awaiting" if receipt is None else receipt["outcome"]
    if receipt is not None and receipt["outcome"] in ("applied", "rejected"):
        label += f" {_when(receipt['issued_at'])}"
    if row["overdue"]:
        label = f"OVERDUE (due {_when(row['receipt_due_at'])}), {label}"
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


AgencyArg = Annotated[str, typer.Argument(help="Agency code, e.g. hmrc.")]
MAX_DEADLINE_MINUTES = 30 * 24 * 60


@receipts_app.command("overdue")
def receipts_overdue(
    agency: Annotated[str | None, typer.Option(help="Only this agency.")] = None,
) -> None:
    """Deliveries still without a final receipt after their agency's deadline."""

    rows = _with_pool(lambda pool: tracker.overdue_deliveries(pool, agency))
    if not rows:
        console.print("No overdue receipts.")
        return
    table = Table("agency", "reference", "event", "delivered at", "due at", "latest receipt", caption="UTC")
    for r in rows:
        table.add_row(
            r["agency"],
            r["reference"],
            str(r["event_id"]),
            _when(r["delivered_at"].isoformat()),
            _when(r["due_at"].isoformat()),
            (r["receipt"] or "none").lower(),
        )
    console.print(table)
    console.print(
        f'{len(rows)} overdue. Send them again with `tuo receipts redeliver AGENCY --overdue --reason "…"`.'
    )


@receipts_app.command("deadline")
def receipts_deadline(
    agency: AgencyArg,
    minutes: Annotated[
        float,
        typer.Argument(
            min=0.01, max=MAX_DEADLINE_MINUTES, help="Minutes the agency has to answer (up to 30 days)."
        ),
    ],
) -> None:
    """Set how long an agency has to send a final receipt for each delivery."""

    if not _with_pool(lambda pool: tracker.set_deadline(pool, agency, timedelta(minutes=minutes))):
        raise _fail(f"no agency {agency!r} has a subscription; see `tuo subscriptions list`")
    console.print(f"{agency} must answer within {timedelta(minutes=minutes)}.")


@receipts_app.command("redeliver")
def receipts_redeliver(
    agency: AgencyArg,
    reason: Annotated[str, typer.Option(help="Why (kept with the redelivery, 3-500 characters).")],
    reference: Annotated[
        list[str] | None, typer.Option("--reference", "-r", help="An event's reference; repeatable.")
    ] = None,
    overdue: Annotated[bool, typer.Option("--overdue", help="Every overdue delivery to the agency.")] = False,
    by: Annotated[str, typer.Option(help="Who asks (recorded).")] = "",
) -> None:
    """Send events to one agency again. Today's subscriptions and consent decide; the
    agency's SDK answers a repeat it already handled with a duplicate receipt."""
    if bool(reference) == overdue:
        raise _fail("name events with --reference, or use --overdue (one of the two)")
    requested_by = by.strip() or getpass.getuser()

    async def queue(pool: asyncpg.Pool) -> redelivery.Redelivery:
        if overdue:
            event_ids = await redelivery.overdue_events(pool, agency)
        else:
            event_ids = await redelivery.events_for_references(
                pool, [r.strip().upper() for r in reference or []]
            )
        return await redelivery.redeliver(
            pool,
            Topics(_settings().topic_prefix),
            agency=agency,
            event_ids=event_ids,
            requested_by=requested_by,
            reason=reason,
        )

    try:
        queued = _with_pool(queue)
    except redelivery.RedeliveryRefused as exc:
        raise _fail(str(exc)) from exc
    if not queued.event_ids:
        console.print(f"Nothing to redeliver: no overdue deliveries to {agency}.")
        return
    console.print(f"Queued {len(queued.event_ids)} event(s) for redelivery to {agency}.")


replay_app = typer.Typer(
    help="Send stored events again to one agency, decided on today's subscriptions and consent.",
    no_args_is_help=True,
)
app.add_typer(replay_app, name="replay")
WITHHELD_LABELS = {
    "WITHHELD_NO_CONSENT": "no consent today",
    "WITHHELD_NO_SUBSCRIPTION": "not subscribed today",
    "WITHHELD_AREA_UNKNOWN": "area unknown (postcode not in the directory)",
    "BLOCKED": "blocked by policy",
    replay.UNROUTABLE: "not routable (see `tuo dlq list`)",
    replay.VOIDED: "voided (never replayed)",
}


def _moment(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise _fail(f"{option} {value[:40]!r} is not a date and time, like 2026-11-01T09:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@replay_app.command("run")
def replay_run(
    agency: AgencyArg,
    reason: Annotated[str, typer.Option(help="Why (kept with the replay, 3-500 characters).")],
    since: Annotated[
        str | None, typer.Option(help="Events recorded at or after (ISO 8601, UTC if no zone).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Events recorded before (ISO 8601).")] = None,
    subject: Annotated[str | None, typer.Option(help="One person: subject id or NINO.")] = None,
    event_id: Annotated[list[str] | None, typer.Option("--event-id", help="An event id; repeatable.")] = None,
    reference: Annotated[
        list[str] | None, typer.Option("--reference", "-r", help="An event's reference; repeatable.")
    ] = None,
    event_type: Annotated[
        list[str] | None,
        typer.Option("--event-type", help="Only this type, e.g. DeathRegistered; repeatable."),
    ] = None,
    everything: Annotated[
        bool, typer.Option("--everything", help="Every stored event (e.g. for a newly onboarded agency).")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be sent and withheld; send nothing.")
    ] = False,
    rate: Annotated[int, typer.Option(help="At most this many events a second.")] = replay.DEFAULT_RATE,
    by: Annotated[str, typer.Option(help="Who asks (recorded).")] = "",
) -> None:
    """Replay stored events to AGENCY only: consent and subscriptions are checked now,
    each event keeps its id (the agency de-duplicates), and the replay is recorded."""
    settings = _settings()
    try:
        selection = replay.Selection.of(
            since=_moment(since, "--since"),
            until=_moment(until, "--until"),
            subject=subject,
            event_ids=event_id or [],
            references=reference or [],
            event_types=event_type or [],
            everything=everything,
            pseudonym_key=settings.require_pseudonym_key,
        )
    except replay.ReplayRefused as exc:
        raise _fail(str(exc)) from exc

    async def begin(pool: asyncpg.Pool) -> replay.Replay:
        return await replay.start(
            pool,
            settings,
            agency=agency,
            selection=selection,
            reason=reason,
            requested_by=by.strip() or getpass.getuser(),
            dry_run=dry_run,
            rate=rate,
        )

    _run_replay(settings, begin)


@replay_app.command("resume")
def replay_resume(
    replay_id: Annotated[str, typer.Argument(help="The replay's id (`tuo replay list`).")],
) -> None:
    """Carry on with a replay that was interrupted, from where it stopped."""
    _run_replay(_settings(), lambda pool: replay.find(pool, replay_id))


@replay_app.command("list")
def replay_list(
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")] = 20,
) -> None:
    """Replays: who asked, why, what they sent and withheld."""
    rows = _with_pool(lambda pool: replay.recent(pool, limit))
    if not rows:
        console.print("No replays yet.")
        return
    table = Table("replay", "agency", "started", "by", "reason", "status", "sent", "withheld", caption="UTC")
    for row in rows:
        found = replay.Replay.of(row)
        status = ("dry run, " if found.dry_run else "") + found.status
        if found.status == "running":
            status += f" ({found.tally.examined:,} of {found.tally.selected:,} done)"
        table.add_row(
            found.id,
            found.agency,
            _when(row["started_at"].isoformat()),
            found.requested_by,
            found.reason,
            status,
            f"{found.tally.sent:,}" + _corrections_words(found.tally, brief=True),
            _withheld_words(found.tally),
        )
    console.print(table)


def _corrections_words(tally: replay.Tally, *, brief: bool = False, verb: str = "sent") -> str:
    """Corrections outside the selection that went with their originals, if any."""
    n = tally.corrections_sent
    if not n:
        return ""
    if brief:
        return f" + {n:,} correction{'s' if n != 1 else ''}"
    return (
        f", and {n:,} correction{'s' if n != 1 else ''} from outside the selection {verb}"
        " with their originals"
    )


def _withheld_words(tally: replay.Tally) -> str:
    counts = sorted(tally.withheld.items())
    return ", ".join(f"{n:,} {WITHHELD_LABELS.get(k, k)}" for k, n in counts) or "none"


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} events/s" if speed else "- events/s")


def _run_replay(settings: Settings, prepare: Callable[[asyncpg.Pool], Awaitable[replay.Replay]]) -> None:
    async def run() -> replay.Replay:
        pool = await open_pool(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Ctrl-C or SIGTERM: finish the batch in hand, save the position, then stop.
        in_main_thread = threading.current_thread() is threading.main_thread()
        signals = (signal.SIGINT, signal.SIGTERM) if in_main_thread else ()
        for signum in signals:
            loop.add_signal_handler(signum, stop.set)
        try:
            chosen = await prepare(pool)
            label = f"{'Dry run' if chosen.dry_run else 'Replaying'} to {chosen.agency}"
            console.print(f"Replay {chosen.id}: {chosen.tally.selected:,} stored events selected.")
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                _Rate(),
                TimeRemainingColumn(),
                console=console,
            ) as progress:
                task = progress.add_task(label, total=chosen.tally.selected, completed=chosen.tally.examined)
                return await replay.Replayer(settings, pool, chosen).run(
                    lambda tally: progress.update(task, completed=tally.examined), stop
                )
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)
            await pool.close()

    try:
        with _clear_errors():
            done = asyncio.run(run())
    except replay.ReplayRefused as exc:
        raise _fail(str(exc)) from exc
    tally = done.tally
    verb = "would be sent" if done.dry_run else "sent"
    console.print(
        f"{tally.sent:,} of {tally.examined:,} events {verb} to {done.agency}"
        f"{_corrections_words(tally, verb=verb)}; withheld: {_withheld_words(tally)}."
    )
    if done.status != "finished":
        console.print(f"Stopped before the end. Carry on with `tuo replay resume {done.id}`.")
        raise typer.Exit(code=3)


@app.command("demo")
def demo_command(
    exit_after_demo: Annotated[
        bool, typer.Option("--exit", help="Stop after printing the receipts instead of serving.")
    ] = False,
) -> None:
    """Start the stack and the bus, submit demo events, print each agency's receipts,
    and keep serving until Ctrl-C; then stop everything this command started."""
    settings = load_settings()
    log_file = settings.state_dir / "bus.log"
    configure_logging(settings, log_file)
    stack = _stack(settings)
    already_running = stack.status().running
    started = time.monotonic()
    try:
        with console.status("Starting the local stack (first run downloads Kafka)…"):
            stack.up()
        console.print(f"Local stack ready in {time.monotonic() - started:.1f}s; bus logs in {log_file}")
        settings = load_settings()
        asyncio.run(_prepare(settings))
        asyncio.run(_run(settings, list(COMPONENTS), demo=True, exit_after_demo=exit_after_demo))
    except (StackError, DemoRefused) as exc:
        raise _fail(str(exc)) from exc
    finally:
        if not already_running:
            with console.status("Stopping the local stack…"):
                stack.down()
            console.print("Local stack stopped; data kept. `tuo stack purge` wipes it.")


async def _run(
    settings: Settings, components: list[str], *, demo: bool, exit_after_demo: bool = False
) -> None:
    pool = await at_startup("postgresql", lambda: open_pool(settings))
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)
    try:
        await at_startup("database migrations", lambda: migrate(pool, settings))
        bus = await start_bus(settings, pool, components)
        try:
            base = f"http://{settings.http_host}:{bus.http_port}"
            console.print(f"Bus running: {', '.join(components)}; intake at {base}/docs")
            if demo:
                sign_in = await seed_demo_registrar(pool, settings.state_dir)
                await seed_agency_records(pool, today_in_the_uk())
                token = await accounts.issue_token(pool, "leeds", "registrar", "demo", timedelta(hours=1))
                await _submit_demo(base, token)
                console.print(
                    f"Registrars' forms: {base}/sign-in — user [bold]{sign_in.username}[/],"
                    f" password in {sign_in.credentials_file}"
                )
                if settings.dev_idp_port is not None:
                    console.print(
                        f"Citizens' pages: {base}/citizen — sign in at the development identity"
                        " provider as Jo Citizen, Chris Example or Amara Okafor"
                    )
            if not (demo and exit_after_demo):
                console.print("Serving until Ctrl-C.")
                await stop_requested.wait()
        finally:
            with console.status("Stopping the bus…"):
                await bus.shutdown()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await pool.close()


async def _submit_demo(base: str, token: str, wait_seconds: float = 60.0) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, timeout=10, headers=headers) as client:
        references = []
        for path, body in demo_submissions(today_in_the_uk()):
            response = await client.post(path, json=body)
            if response.status_code == 409 and "existing_reference" in response.text:
                # A demo run on data kept from an earlier one: the same death and birth are
                # already registered (a person dies once); show those instead.
                references.append(response.json()["existing_reference"])
                continue
            if response.status_code not in (200, 201):
                raise DemoRefused(f"intake refused a demo event: {response.text}")
            references.append(response.json()["reference"])
        console.print(f"Submitted {len(references)} demo events: {', '.join(references)}")
        deadline = time.monotonic() + wait_seconds
        for reference in references:
            while True:
                found = (await client.get(f"/v1/events/{reference}")).json()
                if _settled(found) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            _print_event_status(found)
            console.print(f"  {base}/v1/events/{reference}")


def _settled(found: dict[str, Any]) -> bool:
    agencies = found.get("agencies") or []
    return bool(agencies) and all(a["receipt"] is not None for a in agencies if a["decision"] == "delivered")


def main() -> None:
    app()


# --- Dead letters and consumer lag -------------------------------------------------------

dlq_app = typer.Typer(
    help="Dead letters: messages no component could process; list, show, redrive after a fix.",
    no_args_is_help=True,
)
app.add_typer(dlq_app, name="dlq")
MAX_DLQ_LIMIT = 10_000


def _dlq_call(work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    try:
        return _with_pool(work)
    except (
        dlq.NotADeadLetterId,
        dlq.NoSuchDeadLetter,
        dlq.RedriveRefused,
        dlq.DeadLettersUnreadable,
        consumer_lag.UnknownAgency,
        kafka.NoCredentials,
    ) as exc:
        raise _fail(escape(str(exc))) from exc


def _redriven(letter: dlq.StoredDeadLetter) -> Text:
    if not letter.redrives:
        return Text("no")
    last = letter.redrives[-1]
    done = last.action + (f" to {last.agency}" if last.agency else "")
    times = f" ({len(letter.redrives)}×)" if len(letter.redrives) > 1 else ""
    return Text(f"{done}{times} by {last.requested_by}, {dlq.age(last.requested_at)} ago: {last.reason}")


def _event_label(letter: dlq.StoredDeadLetter) -> str:
    if letter.event_id is not None:
        return str(letter.event_id)
    return "(no ce_id)" if letter.claimed_id is None else f"(not an event id: {letter.claimed_id[:20]})"


@dlq_app.command("list")
def dlq_list(
    agency: Annotated[
        str | None, typer.Option(help="Only this agency's dead letters (`bus`: the shared topic's).")
    ] = None,
    limit: Annotated[int, typer.Option(help=f"The most recent N (1-{MAX_DLQ_LIMIT}).")] = 50,
) -> None:
    """Dead letters, most recent first: why, from where, how long ago, and whether
    they have been redriven (by whom, why)."""
    if not 1 <= limit <= MAX_DLQ_LIMIT:
        raise _fail(f"--limit must be from 1 to {MAX_DLQ_LIMIT}")
    settings = _settings()
    letters = _dlq_call(lambda pool: dlq.list_dead_letters(settings, pool, agency=agency, limit=limit))
    if not letters:
        console.print("No dead letters" + (f" for {escape(agency)}." if agency else "."))
        return
    table = Table("id", "age", "component", "reason", "origin", "event", "type", "redriven")
    for letter in letters:
        table.add_row(
            Text(str(letter.id)),
            letter.age,
            Text(letter.component or "?"),
            Text(dlq.printable(letter.reason or "?", 70)),
            Text(letter.origin),
            Text(_event_label(letter)),
            Text(letter.event_type or ""),
            _redriven(letter),
        )
    console.print(table)
    console.print(
        f"{len(letters)} dead letter(s). `tuo dlq show ID` for one; once its cause is fixed, "
        '`tuo dlq redrive ID --reason "…"`.'
    )


@dlq_app.command("show")
def dlq_show(
    letter_id: Annotated[str, typer.Argument(help="As `tuo dlq list` shows it, e.g. bus:0:17.")],
) -> None:
    """One dead letter: where it came from, why, and what it holds (field names and
    sizes only: the values are personal data)."""
    settings = _settings()
    letter = _dlq_call(lambda pool: dlq.show_dead_letter(settings, pool, letter_id))
    try:
        plan = dlq.plan_redrive(settings.topic_prefix, letter)
        redrive = (
            "republish the stored original on the life-events topic"
            if isinstance(plan, dlq.Republish)
            else f"redeliver the stored original to {plan.agency}"
        )
    except dlq.RedriveRefused as exc:
        redrive = f"no: {exc}"
    fields = letter.fields()
    table = Table(show_header=False, box=None)
    for name, value in (
        ("dead letter", f"{letter.id} ({letter.topic})"),
        ("dead-lettered", f"{letter.dead_lettered_at:%Y-%m-%d %H:%M:%S} UTC, {letter.age} ago"),
        ("component", letter.component or "?"),
        ("reason", letter.reason or "?"),
        ("origin", letter.origin),
        ("event", f"{_event_label(letter)} {letter.event_type or ''}".strip()),
        ("schema", letter.schema()),
        ("size", f"key {letter.key_size} bytes, value {letter.value_size} bytes"),
        ("fields", ", ".join(f"{n} ({size})" for n, size in fields) if fields else "none decoded"),
        ("headers", ", ".join(letter.header_names) or "none"),
        ("redriven", str(_redriven(letter))),
        ("redrive", redrive),
    ):
        table.add_row(Text(name, style="bold"), Text(value))
    console.print(table)


@dlq_app.command("redrive")
def dlq_redrive(
    letter_ids: Annotated[
        list[str] | None, typer.Argument(help="Dead letters' ids as `tuo dlq list` shows them.")
    ] = None,
    reason: Annotated[str, typer.Option(help="Why (kept with the redrive, 3-500 characters).")] = "",
    every: Annotated[bool, typer.Option("--all", help="Every dead letter not redriven yet.")] = False,
    by: Annotated[str, typer.Option(help="Who asks (recorded).")] = "",
    again: Annotated[bool, typer.Option("--again", help="Redrive even if redriven before.")] = False,
    agency: Annotated[
        str | None, typer.Option(help="With --all: only this agency's (`bus`: the shared topic's).")
    ] = None,
) -> None:
    """Send dead letters through the bus again once their cause is fixed: the stored
    original, never the dead letter's own bytes, recorded with who and why. One
    that cannot be redriven is left in place and says why."""
    if bool(letter_ids) == every:
        raise _fail("name dead letters by id, or use --all (one of the two)")
    settings = _settings()
    outcomes = _dlq_call(
        lambda pool: dlq.redrive(
            settings,
            pool,
            None if every else list(letter_ids or []),
            reason=reason,
            requested_by=by.strip() or getpass.getuser(),
            again=again,
            agency=agency,
        )
    )
    if not outcomes:
        console.print("No dead letters.")
        return
    table = Table("id", "outcome", "detail")
    for outcome in outcomes:
        style = {"redriven": "green", "skipped": "yellow"}.get(outcome.outcome, "red")
        table.add_row(Text(str(outcome.id)), Text(outcome.outcome, style=style), Text(outcome.detail))
    console.print(table)
    counts = {k: sum(o.outcome == k for o in outcomes) for k in ("redriven", "skipped", "refused")}
    console.print(
        f"{counts['redriven']} redriven, {counts['skipped']} redriven before (skipped), "
        f"{counts['refused']} refused and left in place."
    )
    if counts["refused"] and not every:
        raise typer.Exit(code=1)


@app.command("lag")
def lag_command(
    agency: Annotated[str | None, typer.Option(help="Only this agency's consumer group.")] = None,
) -> None:
    """Consumer-group lag: how far the router, the receipt tracker and each agency are
    behind what has been written to the topics they read."""
    settings = _settings()
    groups = _dlq_call(lambda pool: consumer_lag.consumer_lag(settings, pool, agency=agency))
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
