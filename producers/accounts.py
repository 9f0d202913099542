"""Who may submit events: registration offices, registrars who sign in with a
password (argon2id), and API clients holding a bearer token bound to an office.

Every submission is made by a ``Submitter``: the office it is recorded for, the
role that decides what it may do, and the name written into the event's
provenance. No role sees another office's events: a supervisor is a registrar
who may also void, and record a death or birth that is already registered. A
token may instead have the ``monitoring`` role, for a system that scrapes
``/metrics`` (counts per agency, no personal data): it can neither submit nor
look up events.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import asyncpg
import structlog
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from producers.office_keys import create_key
from runtime.sealing import PayloadSealer

Role = Literal["registrar", "supervisor"]
ROLES: tuple[Role, ...] = ("registrar", "supervisor")
TokenRole = Literal["registrar", "supervisor", "monitoring"]
TOKEN_ROLES: tuple[TokenRole, ...] = (*ROLES, "monitoring")
TOKEN_PREFIX = "tuo_"  # noqa: S105 (a marker, not a secret)
MIN_PASSWORD_LENGTH = 12

log = structlog.get_logger(__name__)

_hasher = PasswordHasher()
# Verified against when the username is unknown, so a wrong username takes as long as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True)
class Submitter:
    office: str
    office_name: str
    role: Role
    recorded_by: str  # "registrar:<username>" or "api:<token label>"
    display_name: str

    @property
    def may_void(self) -> bool:
        return self.role == "supervisor"

    @property
    def may_override_duplicates(self) -> bool:
        """Record a death or birth that is already registered (with a reason)."""
        return self.role == "supervisor"


class AccountError(ValueError):
    """A user, office or token could not be created; the message says why."""


async def add_office(pool: asyncpg.Pool, code: str, name: str, sealer: PayloadSealer) -> str:
    """Create an office with its first signing key (sealed by ``sealer``); return the key id."""
    async with pool.acquire() as conn, conn.transaction():
        try:
            await conn.execute("INSERT INTO registration_office (code, name) VALUES ($1, $2)", code, name)
        except asyncpg.UniqueViolationError:
            raise AccountError(f"office {code!r} already exists") from None
        except asyncpg.CheckViolationError:
            raise AccountError(
                "an office code is 2-40 lower-case letters, digits or hyphens, starting with a letter"
            ) from None
        return await create_key(conn, code, sealer)


async def ensure_office(pool: asyncpg.Pool, code: str, name: str, sealer: PayloadSealer) -> None:
    """Create the office (with a key) unless it exists; used by seeding."""
    exists = await pool.fetchval("SELECT 1 FROM registration_office WHERE code = $1", code)
    if not exists:
        await add_office(pool, code, name, sealer)


def check_password_strength(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")


async def add_registrar(
    pool: asyncpg.Pool, username: str, display_name: str, office: str, role: Role, password: str
) -> None:
    check_password_strength(password)
    try:
        await pool.execute(
            "INSERT INTO registrar (username, display_name, office, role, password_hash)"
            " VALUES ($1, $2, $3, $4, $5)",
            username,
            display_name,
            office,
            role,
            _hasher.hash(password),
        )
    except asyncpg.UniqueViolationError:
        raise AccountError(f"user {username!r} already exists") from None
    except asyncpg.ForeignKeyViolationError:
        raise AccountError(f"there is no office {office!r}; add it with `tuo offices add`") from None
    except asyncpg.CheckViolationError:
        raise AccountError(
            "a username is 2-60 lower-case letters, digits, dots, hyphens or underscores,"
            " starting with a letter"
        ) from None


async def authenticate(pool: asyncpg.Pool, username: str, password: str) -> Submitter | None:
    """The registrar, if the password is right and the account enabled."""
    row = await pool.fetchrow(
        "SELECT r.username, r.display_name, r.office, o.name AS office_name, r.role, r.password_hash"
        "  FROM registrar r JOIN registration_office o ON o.code = r.office"
        " WHERE r.username = $1 AND r.disabled_at IS NULL",
        username.strip().lower(),
    )
    try:
        _hasher.verify(row["password_hash"] if row else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if row is None:
        return None
    if _hasher.check_needs_rehash(row["password_hash"]):
        await pool.execute(
            "UPDATE registrar SET password_hash = $2 WHERE username = $1",
            row["username"],
            _hasher.hash(password),
        )
    return Submitter(
        office=row["office"],
        office_name=row["office_name"],
        role=row["role"],
        recorded_by=f"registrar:{row['username']}",
        display_name=row["display_name"],
    )


async def registrar(pool: asyncpg.Pool, username: str) -> Submitter | None:
    """An enabled registrar by username (for a signed-in session)."""
    row = await pool.fetchrow(
        "SELECT r.username, r.display_name, r.office, o.name AS office_name, r.role"
        "  FROM registrar r JOIN registration_office o ON o.code = r.office"
        " WHERE r.username = $1 AND r.disabled_at IS NULL",
        username,
    )
    if row is None:
        return None
    return Submitter(
        row["office"], row["office_name"], row["role"], f"registrar:{row['username']}", row["display_name"]
    )


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def issue_token(
    pool: asyncpg.Pool, office: str, role: TokenRole, label: str, valid_for: timedelta = timedelta(days=90)
) -> str:
    """A new bearer token; only its hash is stored, so this is the one time it is seen."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    try:
        await pool.execute(
            "INSERT INTO api_token (id, token_hash, office, role, label, expires_at)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            uuid.uuid4(),
            _token_hash(token),
            office,
            role,
            label,
            datetime.now(UTC) + valid_for,
        )
    except asyncpg.ForeignKeyViolationError:
        raise AccountError(f"there is no office {office!r}; add it with `tuo offices add`") from None
    except asyncpg.CheckViolationError:
        raise AccountError("a token label is 1-200 characters") from None
    return token


@dataclass(frozen=True)
class TokenHolder:
    """The system holding a current API token."""

    label: str
    office: str
    office_name: str
    role: TokenRole

    @property
    def client(self) -> str:
        """Who this is, for counting its requests (labels are unique only within an office)."""
        return f"api:{self.office}/{self.label}"

    def submitter(self) -> Submitter | None:
        """The holder as a submitter of events; None for a monitoring token, which may not submit."""
        if self.role == "monitoring":
            return None
        return Submitter(self.office, self.office_name, self.role, f"api:{self.label}", self.label)


async def token_holder(pool: asyncpg.Pool, token: str) -> TokenHolder | None:
    """The system holding this token, if it is current."""
    found = await _current_token(pool, token)
    return None if found is None else found[0]


async def _current_token(pool: asyncpg.Pool, token: str) -> tuple[TokenHolder, datetime] | None:
    """(its holder, when it expires) for a current token."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    row = await pool.fetchrow(
        "SELECT t.label, t.office, o.name AS office_name, t.role, t.expires_at"
        "  FROM api_token t JOIN registration_office o ON o.code = t.office"
        " WHERE t.token_hash = $1 AND t.revoked_at IS NULL AND t.expires_at > now()",
        _token_hash(token),
    )
    if row is None:
        return None
    return TokenHolder(row["label"], row["office"], row["office_name"], row["role"]), row["expires_at"]


TOKENS_CHANNEL = "tuo_api_tokens"  # migration 0025's triggers NOTIFY here
LISTEN_RETRY_SECONDS = 1.0


class TokenCache:
    """Current API tokens by hash, so a request costs no database look-up.

    It remembers only while it listens on ``TOKENS_CHANNEL``: every change to a token
    or an office (a revocation, from any process) makes it forget everything, within
    the moment PostgreSQL takes to deliver the notice. When its listening connection
    is lost it forgets everything and asks the database every time until it listens
    again. A token it did not find is never remembered, so a new one works at once."""

    def __init__(self, pool: asyncpg.Pool, max_entries: int = 10_000) -> None:
        self.pool = pool
        self.max_entries = max_entries
        self.lookups = 0  # database look-ups made (the rest came from memory)
        self._entries: dict[bytes, tuple[TokenHolder, datetime]] = {}
        self._connection: asyncpg.Connection | None = None
        self._changes = 0  # notices heard so far: a look-up that spans one is not kept
        self._listening: asyncio.Task[None] | None = None
        self._started = self._closed = False  # listen() called; close() called

    async def holder(self, token: str) -> TokenHolder | None:
        """The system holding this token, if it is current (as ``token_holder``)."""
        digest = _token_hash(token)
        if self.listening:
            held = self._entries.get(digest)
            if held is not None and held[1] > datetime.now(UTC):
                return held[0]
        else:
            self._listen_soon()
        changes = self._changes
        self.lookups += 1
        found = await _current_token(self.pool, token)
        if found is None:
            return None
        if self.listening and changes == self._changes:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[digest] = found
        return found[0]

    @property
    def listening(self) -> bool:
        return self._connection is not None and not self._connection.is_closed()

    async def listen(self) -> None:
        """Start listening (the app's start-up; ``close`` at its end); if PostgreSQL cannot
        be reached, the cache asks it every time and tries again on the next request. A
        cache never started never listens, and never holds a connection."""
        self._started = True
        try:
            await self._listen()
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("token_cache_not_listening", error=type(exc).__name__)

    async def _listen(self) -> None:
        connection = await self.pool.acquire()
        if self._closed:  # closed while it waited for the connection
            await self.pool.release(connection)
            return
        try:
            connection.add_termination_listener(self._lost)
            await connection.add_listener(TOKENS_CHANNEL, self._changed)
        except BaseException:
            await self.pool.release(connection)
            raise
        self._entries.clear()  # anything learnt before listening may be stale
        self._connection = connection

    def _listen_soon(self) -> None:
        if not self._started or self._closed or (self._listening is not None and not self._listening.done()):
            return

        async def again() -> None:
            await asyncio.sleep(LISTEN_RETRY_SECONDS)
            await self.listen()

        self._listening = asyncio.get_running_loop().create_task(again())

    def _changed(self, *_: object) -> None:
        self._changes += 1
        self._entries.clear()

    def _lost(self, *_: object) -> None:
        self._connection = None
        self._changes += 1
        self._entries.clear()

    async def close(self) -> None:
        self._closed = True
        if self._listening is not None:
            self._listening.cancel()
        connection, self._connection = self._connection, None
        self._entries.clear()
        if connection is not None and not connection.is_closed():
            connection.remove_termination_listener(self._lost)
            await connection.remove_listener(TOKENS_CHANNEL, self._changed)  # UNLISTEN
            await self.pool.release(connection)


async def revoke_tokens(pool: asyncpg.Pool, label: str) -> int:
    result: str = await pool.execute(
        "UPDATE api_token SET revoked_at = now() WHERE label = $1 AND revoked_at IS NULL", label
    )
    return int(result.split()[-1])
