"""Applying a batch set-wise where an agency can: each run of consecutive deaths in a
few statements, whatever its length; anything else one event at a time, in order,
exactly as the agency's handler of one event would.

A run ends at any other event, and at a second death with a key already in it. DWP
and HMRC key deaths by NINO: a second death of one person must see what the first
did. DVLA and the councils key them by event, since their ``on_deaths`` walks the
run in order itself over what it read at once. Either way the outcome is the same as
applying each event in turn (``tests/consumers/test_reference_agencies.py`` proves
it per agency).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Generic, TypeVar

import asyncpg

from consumers.agencies import delivery
from consumers.sdk import DeliveredEvent, EachInTurn, Handler, RejectEvent

D = TypeVar("D")


@dataclass(frozen=True)
class Death:
    """A death as DWP and HMRC find their records: by NINO."""

    event_id: uuid.UUID
    nino: str
    died_on: date


def read_death(event: DeliveredEvent) -> Death:
    return Death(delivery.event_uuid(event), delivery.nino(event), delivery.day(event, "date_of_death"))


def by_nino(death: Death) -> Hashable:
    return death.nino


@dataclass(frozen=True)
class DeathsSetWise(Generic[D]):
    """An agency's handler: ``handle`` for one event, ``on_deaths`` for a run of deaths.

    ``read`` takes from a death what ``on_deaths`` needs, raising ``RejectEvent`` as
    ``handle`` would before touching anything; ``on_deaths`` applies a run and returns
    its rejections (event id → reason); ``key`` says which deaths may share a run."""

    handle: Handler
    read: Callable[[DeliveredEvent], D]
    on_deaths: Callable[[asyncpg.Connection, list[D]], Awaitable[dict[str, str]]]
    key: Callable[[D], Hashable]

    async def __call__(self, event: DeliveredEvent, conn: asyncpg.Connection) -> None:
        await self.handle(event, conn)

    async def handle_batch(
        self, events: Sequence[DeliveredEvent], conn: asyncpg.Connection
    ) -> Mapping[str, str]:
        rejected: dict[str, str] = {}
        run: dict[Hashable, D] = {}

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
                death = self.read(event)
            except RejectEvent as rejection:  # nothing to apply: no effect to undo
                rejected[event.event_id] = rejection.reason
                continue
            key = self.key(death)
            if key in run:
                await end_run()
            run[key] = death
        await end_run()
        return rejected
