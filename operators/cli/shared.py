"""What every `tuo` command shares: the terminal, settings, one-line errors and a database pool."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated, TypeVar

import asyncpg
import typer
from aiokafka.errors import KafkaError
from rich.console import Console

from runtime.database import open_pool
from runtime.logging import configure_logging
from runtime.settings import MissingSetting, Settings, load_settings

T = TypeVar("T")
console = Console()
err = Console(stderr=True)
AgencyArg = Annotated[str, typer.Argument(help="Agency code, e.g. hmrc.")]


def command_settings() -> Settings:
    """The settings, with logging configured by them: what a command starts with."""
    settings = load_settings()
    configure_logging(settings)
    return settings


def fail(message: str) -> typer.Exit:
    err.print(f"[bold red]Error:[/] {message}")
    return typer.Exit(code=1)


@contextlib.contextmanager
def clear_errors() -> Iterator[None]:
    """Turn configuration and connection failures into one-line messages."""
    try:
        yield
    except MissingSetting as exc:
        raise fail(str(exc)) from exc
    except (OSError, asyncpg.PostgresError) as exc:
        raise fail(f"cannot use PostgreSQL: {exc}") from exc
    except KafkaError as exc:
        raise fail(f"cannot use Kafka: {exc}") from exc


def with_pool(work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    async def run() -> T:
        pool = await open_pool(command_settings())
        try:
            return await work(pool)
        finally:
            await pool.close()

    with clear_errors():
        return asyncio.run(run())


def when(moment: str | None) -> str:
    return moment[:19].replace("T", " ") if moment else "-"
