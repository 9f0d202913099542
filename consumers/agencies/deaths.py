"""Applying a batch set-wise where an agency can: each run of consecutive deaths of
different people (by NINO) in a few statements, whatever its length; anything else
one event at a time, in order, exactly as the agency's handler of one event would.

A run ends at any other event, and at a second death with a NINO already in it (that
death must see what the first one did), so the outcome is the same as applying each
event in turn (``tests/consumers/test_reference_agencies.py`` proves it per agency).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date

import asyncpg

from consumers.agencies import delivery
from consumers.sdk import DeliveredEvent, EachInTurn, Handler, RejectEvent


@dataclass(frozen=True)
class Death:
    event_id: uuid.UUID
    nino: str
    died_on: date


# Applies deaths of different people; returns the rejections (event id → reason).
OnDeaths = Callable[[asyncpg.Connection, list[Death]], Awaitable[dict[str, str]]]


@dataclass(frozen=True)
class DeathsSetWise:
    """An agency's handler: ``handle`` for one event, ``on_deaths`` for a run of deaths."""

    handle: Handler
    on_deaths: OnDeaths

    async def __call__(self, event: DeliveredEvent, conn: asyncpg.Connection) -> None:
        await self.handle(event, conn)

    async def handle_batch(
        self, events: Sequence[DeliveredEvent], conn: asyncpg.Connection
    ) -> Mapping[str, str]:
        rejected: dict[str, str] = {}
        run: dict[str, Death] = {}  # by NINO

        async def end_run() -> None:
            if run:
                rejected.update(await self.on_deaths(conn, list(run.values())))
                run.clear()

        for event in events:
            if event.event_type != "DeathRegistered":
                await end_run()
                rejected.update(await EachInTurn(self.handle).handle_batch([event], conn))
                continue
            try:
                death = Death(
                    delivery.event_uuid(event), delivery.nino(event), delivery.day(event, "date_of_death")
                )
            except RejectEvent as rejection:  # nothing to apply: no effect to undo
                rejected[event.event_id] = rejection.reason
                continue
            if death.nino in run:
                await end_run()
            run[death.nino] = death
        await end_run()
        return rejected
