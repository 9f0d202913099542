"""Caches that forget on PostgreSQL's word: what a hot path would otherwise look up
per request (a token, the agencies that take consent, an office's signing key), kept
in memory only while a connection listens for changes to it.

One ``Notices`` per process holds one listening connection for all its caches. A
migration's trigger ``NOTIFY``s a channel on every change to the rows behind it,
whoever makes the change (a command, another process, plain SQL), and each cache on
that channel forgets everything within the moment PostgreSQL takes to deliver the
notice. When the listening connection is lost, every cache forgets and asks the
database every time until it listens again, so a change is never missed. A value
the database did not have (``None``) is never remembered, so a new row is seen at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Generic, TypeVar

import asyncpg
import structlog

log = structlog.get_logger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

LISTEN_RETRY_SECONDS = 1.0


class Notices:
    """One listening connection, and the caches it keeps honest."""

    def __init__(self, pool: asyncpg.Pool, channels: Iterable[str]) -> None:
        self.pool = pool
        self.channels = tuple(channels)
        self.connection: asyncpg.Connection | None = None
        self._caches: dict[str, list[NoticedCache[object, object]]] = {c: [] for c in self.channels}
        self._retry: asyncio.Task[None] | None = None
        self._started = self._closed = False  # listen() called; close() called

    def cache(
        self,
        channel: str,
        load: Callable[[K], Awaitable[V | None]],
        *,
        fresh: Callable[[V], bool] = lambda _: True,
        max_entries: int = 10_000,
    ) -> NoticedCache[K, V]:
        """A cache of ``load``'s answers, forgotten on every notice on ``channel``;
        ``fresh`` says whether a remembered value may still be used (an expiry)."""
        if channel not in self._caches:
            raise ValueError(f"{channel!r} is not one of the channels listened on: {self.channels}")
        cache: NoticedCache[K, V] = NoticedCache(self, load, fresh, max_entries)
        self._caches[channel].append(cache)  # type: ignore[arg-type]
        return cache

    @property
    def listening(self) -> bool:
        return self.connection is not None and not self.connection.is_closed()

    async def listen(self) -> None:
        """Start listening (at the app's start-up; ``close`` at its end). If PostgreSQL
        cannot be reached, the caches ask it every time and listening is tried again on
        the next look-up. Never started, it never listens and holds no connection."""
        self._started = True
        try:
            await self._listen()
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("notices_not_listening", channels=self.channels, error=type(exc).__name__)

    async def _listen(self) -> None:
        connection = await self.pool.acquire()
        if self._closed:  # closed while it waited for the connection
            await self.pool.release(connection)
            return
        try:
            connection.add_termination_listener(self._lost)
            for channel in self.channels:
                await connection.add_listener(channel, self._changed)
        except BaseException:
            await self.pool.release(connection)
            raise
        self._forget(self.channels)  # anything learnt before listening may be stale
        self.connection = connection

    def listen_soon(self) -> None:
        """Try listening again shortly (a cache asked while not listening)."""
        if not self._started or self._closed or (self._retry is not None and not self._retry.done()):
            return

        async def again() -> None:
            await asyncio.sleep(LISTEN_RETRY_SECONDS)
            await self.listen()

        self._retry = asyncio.get_running_loop().create_task(again())

    def _changed(self, _connection: object, _pid: object, channel: str, _payload: object) -> None:
        self._forget((channel,))

    def _lost(self, *_: object) -> None:
        self.connection = None
        self._forget(self.channels)

    def _forget(self, channels: Iterable[str]) -> None:
        for channel in channels:
            for cache in self._caches.get(channel, ()):
                cache.forget()

    async def close(self) -> None:
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        connection, self.connection = self.connection, None
        self._forget(self.channels)
        if connection is not None and not connection.is_closed():
            connection.remove_termination_listener(self._lost)
            for channel in self.channels:
                await connection.remove_listener(channel, self._changed)  # UNLISTEN
            await self.pool.release(connection)


class NoticedCache(Generic[K, V]):
    """``load``'s answers by key, remembered while ``notices`` listens (see the module)."""

    def __init__(
        self,
        notices: Notices,
        load: Callable[[K], Awaitable[V | None]],
        fresh: Callable[[V], bool],
        max_entries: int,
    ) -> None:
        self.notices = notices
        self.lookups = 0  # times ``load`` was called (the rest came from memory)
        self._load = load
        self._fresh = fresh
        self._max_entries = max_entries
        self._entries: dict[K, V] = {}
        self._changes = 0  # notices heard: a look-up that spans one is not kept

    async def get(self, key: K) -> V | None:
        if self.notices.listening:
            held = self._entries.get(key)
            if held is not None and self._fresh(held):
                return held
        else:
            self.notices.listen_soon()
        changes = self._changes
        self.lookups += 1
        found = await self._load(key)
        if found is not None and self.notices.listening and changes == self._changes:
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
            self._entries[key] = found
        return found

    def forget(self) -> None:
        self._changes += 1
        self._entries.clear()
