"""An agency consumer for the crash test, run as its own process.

    python -m tests.tools.crashing_agency <agency> [--crash]

Its handler records each event in ``crash_effect`` (one row per application,
so applying twice would show). With ``--crash`` the process SIGKILLs itself at
the moment the SDK is about to send its first receipt: after the handler's
effect and the inbox row have committed, before the receipt exists anywhere.
Settings come from the environment (``TUO_*``), as for any component.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from typing import Any

import asyncpg

from consumers.sdk import AgencyConsumer, DeliveredEvent
from runtime.database import open_pool
from runtime.settings import load_settings


async def record_effect(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
    await conn.execute("INSERT INTO crash_effect (event_id) VALUES ($1)", uuid.UUID(event.event_id))


async def die(*args: Any, **kwargs: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


async def main(agency: str, crash: bool) -> None:
    settings = load_settings()
    pool = await open_pool(settings)
    if crash:
        AgencyConsumer._send_receipts = die  # type: ignore[method-assign]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await AgencyConsumer(settings, pool, agency, record_effect).run(stop)
    finally:
        await pool.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], "--crash" in sys.argv[2:]))
