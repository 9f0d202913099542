"""`tuo stack`: the local Kafka and PostgreSQL on loopback, for development and the demo."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.table import Table

from devstack import LocalStack, StackError
from operators.cli.database import prepare
from operators.cli.shared import command_settings, console, fail
from runtime.settings import Settings, load_settings

stack_app = typer.Typer(help="The local stack: Kafka and PostgreSQL on loopback.", no_args_is_help=True)


def local_stack(settings: Settings, brokers: int | None = None) -> LocalStack:
    return LocalStack(
        settings.state_dir,
        settings.cache_dir,
        settings.kafka_version,
        settings.kafka_heap,
        settings.topic_prefix,
        brokers=brokers,
    )


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
    settings = command_settings()
    with console.status("Starting the local stack…"):
        try:
            times = local_stack(settings, brokers).up()
        except StackError as exc:
            raise fail(str(exc)) from exc
        asyncio.run(prepare(load_settings()))
    console.print(
        f"Stack up: jars {times.jars_seconds:.1f}s, PostgreSQL {times.postgres_seconds:.1f}s, "
        f"Kafka {times.kafka_seconds:.1f}s"
    )
    _print_stack_status(settings)


@stack_app.command("down")
def stack_down() -> None:
    """Stop Kafka and PostgreSQL; their data stays on disk."""
    settings = command_settings()
    local_stack(settings).down()
    console.print("Stack stopped; data kept in " + str(settings.state_dir))


@stack_app.command("purge")
def stack_purge(
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Stop the stack and delete all its data (the downloaded jars are kept)."""
    settings = command_settings()
    if not yes and not typer.confirm(f"Delete all data in {settings.state_dir}?"):
        raise typer.Exit(code=1)
    local_stack(settings).purge()
    console.print("Stack purged.")


@stack_app.command("status")
def stack_status() -> None:
    """Show whether Kafka and PostgreSQL are running, and where."""
    _print_stack_status(command_settings())


def _print_stack_status(settings: Settings) -> None:
    status = local_stack(settings).status()
    table = Table("component", "state", "address")
    table.add_row("Kafka", _running(status.kafka_running), status.bootstrap_servers or "-")
    table.add_row("PostgreSQL", _running(status.postgres_running), status.database or "-")
    console.print(table)
    console.print(f"State directory: {status.state_dir}")


def _running(flag: bool) -> str:
    return "[green]running[/]" if flag else "[yellow]stopped[/]"
