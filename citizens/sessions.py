"""Citizens' sessions and sign-ins under way, kept in PostgreSQL.

Sessions are kept as registrars' are, by the one ``SessionStore`` of
``runtime.web.sessions``, in a table and a cookie of their own: the browser holds a
random token in an HttpOnly cookie, the database only its SHA-256. A citizen's
session knows them by pseudonymous subject id; the name to greet them by is sealed,
bound to the session. It ends at sign-out, after ``session_idle_minutes`` without a
request, or ``session_max_hours`` after sign-in.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from runtime.sealing import PayloadSealer
from runtime.web.sessions import SessionStore, token_hash

# How long the provider may take to send the citizen back (they may have to sign in there).
SIGN_IN_MINUTES = 10


@dataclass(frozen=True)
class CitizenSession:
    token_hash: bytes
    subject_id: str
    display_name: str
    csrf_token: str


@dataclass(frozen=True)
class PendingSignIn:
    """What was sent to the provider, to check its answer against."""

    nonce: str
    code_verifier: str
    return_to: str | None


async def begin_sign_in(
    pool: asyncpg.Pool, state: str, browser_token: str, nonce: str, code_verifier: str, return_to: str | None
) -> None:
    # Sign-ins never finished are forgotten once they could no longer be finished.
    await pool.execute(
        "DELETE FROM citizen_sign_in WHERE created_at < now() - make_interval(mins => $1)",
        SIGN_IN_MINUTES,
    )
    await pool.execute(
        "INSERT INTO citizen_sign_in (state_hash, browser_hash, nonce, code_verifier, return_to)"
        " VALUES ($1, $2, $3, $4, $5)",
        token_hash(state),
        token_hash(browser_token),
        nonce,
        code_verifier,
        return_to,
    )


async def take_sign_in(pool: asyncpg.Pool, state: str, browser_token: str) -> PendingSignIn | None:
    """The sign-in this ``state`` belongs to, if this browser started it in the last few
    minutes. It is deleted either way: a state is good for one answer."""
    if not state or len(state) > 200 or not browser_token:
        return None
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "DELETE FROM citizen_sign_in WHERE created_at < now() - make_interval(mins => $1)",
            SIGN_IN_MINUTES,
        )
        row = await conn.fetchrow(
            "DELETE FROM citizen_sign_in WHERE state_hash = $1"
            " RETURNING browser_hash, nonce, code_verifier, return_to",
            token_hash(state),
        )
    if row is None or bytes(row["browser_hash"]) != token_hash(browser_token):
        return None
    return PendingSignIn(row["nonce"], row["code_verifier"], row["return_to"])


def _citizen_session(row: asyncpg.Record, hashed: bytes, sealer: PayloadSealer) -> CitizenSession:
    name = sealer.open(bytes(row["display_name"]), hashed).decode()
    return CitizenSession(hashed, row["subject_id"], name, row["csrf_token"])


CITIZEN_SESSIONS = SessionStore("citizen_session", ("subject_id", "display_name"), _citizen_session)


async def start_session(
    pool: asyncpg.Pool, sealer: PayloadSealer, subject_id: str, display_name: str
) -> tuple[str, CitizenSession]:
    """A new session for a citizen who has just signed in; returns the cookie's token."""
    token, hashed, csrf_token = await CITIZEN_SESSIONS.start(
        pool, lambda hashed: (subject_id, sealer.seal(display_name.encode(), hashed))
    )
    return token, CitizenSession(hashed, subject_id, display_name, csrf_token)
