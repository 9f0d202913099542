"""`tuo migrate` and `tuo seed`: the database's migrations and the demo subscriptions."""

from __future__ import annotations

import asyncio

from devstack.demo import seed_offices
from operators.cli.shared import clear_errors, command_settings, console
from router.seed import load_seed
from runtime import access
from runtime.database import migrate, open_pool
from runtime.sealing import PayloadSealer
from runtime.settings import Settings


async def prepare(settings: Settings, seed: bool = True) -> None:
    pool = await open_pool(settings)
    try:
        await migrate(pool, settings)
        if seed:
            await load_seed(pool)
            await seed_offices(pool, PayloadSealer.from_settings(settings))
            await access.onboard_subscribed_agencies(settings, pool, by="tuo seed")
    finally:
        await pool.close()


def migrate_command() -> None:
    """Apply pending database migrations."""
    with clear_errors():
        asyncio.run(prepare(command_settings(), seed=False))
    console.print("Database up to date.")


def seed_command() -> None:
    """Load the demo agencies' subscriptions (for the local stack, not production)."""
    with clear_errors():
        asyncio.run(prepare(command_settings(), seed=True))
    console.print("Demo subscriptions loaded.")
