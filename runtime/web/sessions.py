"""Registrars' sign-in sessions, kept in PostgreSQL, and the sign-in throttle.

The browser holds a random token in an HttpOnly cookie; the database keeps only
its SHA-256, the registrar, the CSRF token for the session's forms, and the
draft answers between form steps. A session ends at sign-out, after
``session_idle_minutes`` without a request, or ``session_max_hours`` after
sign-in, whichever comes first; an ended session's row (and so its drafts) is
deleted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any

import asyncpg
from starlette.responses import Response

from runtime.sealing import PayloadSealer
from runtime.settings import Settings

# Five wrong passwords for a username within 15 minutes, and it cannot sign in
# until those 15 minutes are up.
MAX_SIGN_IN_FAILURES = 5
SIGN_IN_LOCKOUT_MINUTES = 15


@dataclass(frozen=True)
class Session:
    token_hash: bytes
    username: str
    csrf_token: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Expired:
    """There was a session, but it has timed out."""


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def same_secret(expected: str, given: str | None) -> bool:
    """Constant-time comparison, so timing does not reveal how much of a token is right."""
    if not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


async def start_session(pool: asyncpg.Pool, username: str) -> tuple[str, Session]:
    """A new session for a registrar who has just signed in; returns the cookie's token."""
    token = new_secret()
    session = Session(_hash(token), username, new_secret(), {})
    await pool.execute(
        "INSERT INTO web_session (token_hash, username, csrf_token) VALUES ($1, $2, $3)",
        session.token_hash,
        username,
        session.csrf_token,
    )
    return token, session


async def find_session(
    pool: asyncpg.Pool, sealer: PayloadSealer, token: str, settings: Settings
) -> Session | Expired | None:
    """The session this token opens, touched so its idle time starts again."""
    if not token or len(token) > 100:
        return None
    token_hash = _hash(token)
    row = await pool.fetchrow(
        "SELECT username, csrf_token, data::text AS data,"
        "       last_seen_at < now() - make_interval(mins => $2)"
        "         OR created_at < now() - make_interval(hours => $3) AS expired"
        "  FROM web_session WHERE token_hash = $1",
        token_hash,
        settings.session_idle_minutes,
        settings.session_max_hours,
    )
    if row is None:
        return None
    if row["expired"]:
        await end_session(pool, token_hash)
        return Expired()
    await pool.execute("UPDATE web_session SET last_seen_at = now() WHERE token_hash = $1", token_hash)
    data = {key: _open(sealer, token_hash, value) for key, value in json.loads(row["data"]).items()}
    return Session(token_hash, row["username"], row["csrf_token"], data)


# Draft answers hold names, NINOs and dates of birth: each entry is sealed, bound to
# its session, and stored as a base64 string.


def _seal(sealer: PayloadSealer, token_hash: bytes, value: Any) -> str:
    return base64.b64encode(sealer.seal(json.dumps(value).encode(), token_hash)).decode()


def _open(sealer: PayloadSealer, token_hash: bytes, stored: Any) -> Any:
    return json.loads(sealer.open(base64.b64decode(str(stored)), token_hash))


async def end_session(pool: asyncpg.Pool, token_hash: bytes) -> None:
    await pool.execute("DELETE FROM web_session WHERE token_hash = $1", token_hash)


async def end_session_for_token(pool: asyncpg.Pool, token: str) -> None:
    await end_session(pool, _hash(token))


async def forget_expired_sessions(pool: asyncpg.Pool, settings: Settings) -> int:
    """Delete timed-out sessions, with the draft answers they hold."""
    result: str = await pool.execute(
        "DELETE FROM web_session WHERE last_seen_at < now() - make_interval(mins => $1)"
        "   OR created_at < now() - make_interval(hours => $2)",
        settings.session_idle_minutes,
        settings.session_max_hours,
    )
    return int(result.split()[-1])


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

    def set(self, response: Response, name: str, value: str) -> None:
        # No Max-Age: the cookie goes when the browser closes; the server ends the session sooner.
        response.set_cookie(name, value, path="/", secure=self.secure, httponly=True, samesite="lax")

    def clear(self, response: Response, name: str) -> None:
        response.delete_cookie(name, path="/", secure=self.secure, httponly=True, samesite="lax")
