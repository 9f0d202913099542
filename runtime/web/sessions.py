"""Sign-in sessions, kept in PostgreSQL: one ``SessionStore`` for every kind of user
(registrars here, citizens in ``citizens.sessions``), each in its own table with its
own cookie; and the registrars' draft answers and sign-in throttle.

The browser holds a random token in an HttpOnly cookie; the database keeps only
its SHA-256, the user, and the CSRF token for the session's forms (a registrar's
session also keeps the draft answers between form steps). A session ends at
sign-out, after ``session_idle_minutes`` without a request, or
``session_max_hours`` after sign-in, whichever comes first; an ended session's
row (and so its drafts) is deleted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import asyncpg
from starlette.responses import Response

from runtime.sealing import PayloadSealer
from runtime.settings import Settings

# Five wrong passwords for a username within 15 minutes, and it cannot sign in
# until those 15 minutes are up.
MAX_SIGN_IN_FAILURES = 5
SIGN_IN_LOCKOUT_MINUTES = 15

S = TypeVar("S")


@dataclass(frozen=True)
class Expired:
    """There was a session, but it has timed out."""


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def same_secret(expected: str, given: str | None) -> bool:
    """Constant-time comparison, so timing does not reveal how much of a token is right."""
    if not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


@dataclass(frozen=True)
class SessionStore(Generic[S]):
    """One kind of user's sessions: rows of ``table`` keyed by the token's hash, each
    with its CSRF token, when it was started and last used, and ``columns`` about the
    user. ``opened`` makes a found row (``columns`` and ``also_read``, with its hash and
    the sealer for what is sealed to the session) into the session its pages see.
    The table and column names are this code's own, never a request's."""

    table: str
    columns: tuple[str, ...]
    opened: Callable[[asyncpg.Record, bytes, PayloadSealer], S]
    also_read: tuple[str, ...] = ()

    async def start(
        self, pool: asyncpg.Pool, values: Callable[[bytes], Sequence[Any]]
    ) -> tuple[str, bytes, str]:
        """A new session for someone who has just signed in: the cookie's token, its hash
        and the CSRF token. ``values`` gives ``columns`` for the hash (a value sealed to
        the session is bound to it)."""
        token = new_secret()
        hashed, csrf_token = token_hash(token), new_secret()
        names = ", ".join(("token_hash", "csrf_token", *self.columns))
        places = ", ".join(f"${n}" for n in range(1, len(self.columns) + 3))
        await pool.execute(
            f"INSERT INTO {self.table} ({names}) VALUES ({places})", hashed, csrf_token, *values(hashed)
        )
        return token, hashed, csrf_token

    async def find(
        self, pool: asyncpg.Pool, sealer: PayloadSealer, token: str, settings: Settings
    ) -> S | Expired | None:
        """The session this token opens, touched so its idle time starts again."""
        if not token or len(token) > 100:
            return None
        hashed = token_hash(token)
        row = await pool.fetchrow(
            f"SELECT csrf_token, {', '.join((*self.columns, *self.also_read))},"
            "       last_seen_at < now() - make_interval(mins => $2)"
            "         OR created_at < now() - make_interval(hours => $3) AS expired"
            f"  FROM {self.table} WHERE token_hash = $1",
            hashed,
            settings.session_idle_minutes,
            settings.session_max_hours,
        )
        if row is None:
            return None
        if row["expired"]:
            await self.end(pool, hashed)
            return Expired()
        await pool.execute(f"UPDATE {self.table} SET last_seen_at = now() WHERE token_hash = $1", hashed)
        return self.opened(row, hashed, sealer)

    async def end(self, pool: asyncpg.Pool, hashed: bytes) -> None:
        await pool.execute(f"DELETE FROM {self.table} WHERE token_hash = $1", hashed)

    async def forget_expired(self, pool: asyncpg.Pool, settings: Settings) -> int:
        """Delete timed-out sessions, with whatever they hold."""
        result: str = await pool.execute(
            f"DELETE FROM {self.table} WHERE last_seen_at < now() - make_interval(mins => $1)"
            "   OR created_at < now() - make_interval(hours => $2)",
            settings.session_idle_minutes,
            settings.session_max_hours,
        )
        return int(result.split()[-1])


@dataclass(frozen=True)
class Session:
    """A registrar's session."""

    token_hash: bytes
    username: str
    csrf_token: str
    data: dict[str, Any]


def _registrar_session(row: asyncpg.Record, hashed: bytes, sealer: PayloadSealer) -> Session:
    data = {key: _open(sealer, hashed, value) for key, value in json.loads(row["data"]).items()}
    return Session(hashed, row["username"], row["csrf_token"], data)


REGISTRAR_SESSIONS = SessionStore("web_session", ("username",), _registrar_session, ("data::text AS data",))
# Where a contact-centre agent's session leads: the informant's journey by telephone
# (citizens.informants); an agent records nothing at the desk.
PHONE_JOURNEY_PATH = "/tell-us-once/phone"
STAFF_SIGN_OUT_PATH = "/sign-out"  # ends a registrar's or an agent's session (producers.web)


async def start_session(pool: asyncpg.Pool, username: str) -> tuple[str, Session]:
    """A new session for a registrar who has just signed in; returns the cookie's token."""
    token, hashed, csrf_token = await REGISTRAR_SESSIONS.start(pool, lambda _: (username,))
    return token, Session(hashed, username, csrf_token, {})


# The names the registrars' pages (producers.web.routes) call.
find_session = REGISTRAR_SESSIONS.find
end_session = REGISTRAR_SESSIONS.end
forget_expired_sessions = REGISTRAR_SESSIONS.forget_expired


async def end_session_for_token(pool: asyncpg.Pool, token: str) -> None:
    await end_session(pool, token_hash(token))


# Draft answers hold names, NINOs and dates of birth: each entry is sealed, bound to
# its session, and stored as a base64 string.


def _seal(sealer: PayloadSealer, hashed: bytes, value: Any) -> str:
    return base64.b64encode(sealer.seal(json.dumps(value).encode(), hashed)).decode()


def _open(sealer: PayloadSealer, hashed: bytes, stored: Any) -> Any:
    return json.loads(sealer.open(base64.b64decode(str(stored)), hashed))


async def remember(pool: asyncpg.Pool, sealer: PayloadSealer, session: Session, key: str, value: Any) -> None:
    """Set one entry of the session's data (each entry is written on its own, so two
    requests at once for different entries do not undo each other)."""
    await pool.execute(
        "UPDATE web_session SET data = data || jsonb_build_object($2::text, $3::text) WHERE token_hash = $1",
        session.token_hash,
        key,
        _seal(sealer, session.token_hash, value),
    )


async def forget(pool: asyncpg.Pool, session: Session, key: str) -> None:
    await pool.execute(
        "UPDATE web_session SET data = data - $2 WHERE token_hash = $1", session.token_hash, key
    )


async def replace(
    pool: asyncpg.Pool, sealer: PayloadSealer, session: Session, forget_key: str, key: str, value: Any
) -> None:
    """Drop one entry and set another in one statement (a sent draft becomes its reference)."""
    await pool.execute(
        "UPDATE web_session SET data = (data - $2) || jsonb_build_object($3::text, $4::text)"
        " WHERE token_hash = $1",
        session.token_hash,
        forget_key,
        key,
        _seal(sealer, session.token_hash, value),
    )


def _throttle_key(username: str) -> str:
    return username.strip().lower()[:100]


async def sign_in_locked(pool: asyncpg.Pool, username: str) -> bool:
    """Too many recent failures for this username (whether or not it exists)."""
    locked: bool | None = await pool.fetchval(
        "SELECT failures >= $2 FROM sign_in_failure"
        " WHERE username = $1 AND first_failed_at > now() - make_interval(mins => $3)",
        _throttle_key(username),
        MAX_SIGN_IN_FAILURES,
        SIGN_IN_LOCKOUT_MINUTES,
    )
    return bool(locked)


async def record_sign_in_failure(pool: asyncpg.Pool, username: str) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "DELETE FROM sign_in_failure WHERE first_failed_at < now() - make_interval(mins => $1)",
            SIGN_IN_LOCKOUT_MINUTES,
        )
        await conn.execute(
            "INSERT INTO sign_in_failure (username, failures, first_failed_at) VALUES ($1, 1, now())"
            " ON CONFLICT (username) DO UPDATE SET failures = sign_in_failure.failures + 1",
            _throttle_key(username),
        )


async def clear_sign_in_failures(pool: asyncpg.Pool, username: str) -> None:
    await pool.execute("DELETE FROM sign_in_failure WHERE username = $1", _throttle_key(username))


@dataclass(frozen=True)
class CookiePolicy:
    secure: bool

    @property
    def session(self) -> str:
        # __Host-: the browser only accepts it over HTTPS, for this host and path "/".
        return "__Host-tuo-session" if self.secure else "tuo-session"

    @property
    def sign_in(self) -> str:
        return "__Host-tuo-sign-in" if self.secure else "tuo-sign-in"

    @property
    def informant(self) -> str:
        """The informant's journey (citizens.informants): a session of its own."""
        return "__Host-tuo-informant" if self.secure else "tuo-informant"

    def set(self, response: Response, name: str, value: str) -> None:
        # No Max-Age: the cookie goes when the browser closes; the server ends the session sooner.
        response.set_cookie(name, value, path="/", secure=self.secure, httponly=True, samesite="lax")

    def clear(self, response: Response, name: str) -> None:
        response.delete_cookie(name, path="/", secure=self.secure, httponly=True, samesite="lax")
