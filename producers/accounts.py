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

import functools
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
from runtime.notices import NoticedCache, Notices
from runtime.sealing import PayloadSealer

# An agent is a contact-centre agent: signs in, but only to take informants through their
# journey by telephone (citizens.informants); they record nothing at the desk.
Role = Literal["registrar", "supervisor", "agent"]
ROLES: tuple[Role, ...] = ("registrar", "supervisor", "agent")
TokenRole = Literal["registrar", "supervisor", "monitoring"]
TOKEN_ROLES: tuple[TokenRole, ...] = ("registrar", "supervisor", "monitoring")
TOKEN_PREFIX = "tuo_"  # noqa: S105 (a marker, not a secret)
MIN_PASSWORD_LENGTH = 12

log = structlog.get_logger(__name__)

_hasher = PasswordHasher()


@functools.cache
def dummy_password_hash() -> str:
    """Verified against when the username is unknown, so a wrong username takes as long as
    a wrong password. Made on first use, not on import: an argon2 hash costs ~0.2 s, which
    every `tuo` command would otherwise pay. Intake makes it as it starts."""
    return _hasher.hash(secrets.token_urlsafe(16))


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
        _hasher.verify(row["password_hash"] if row else dummy_password_hash(), password)
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
    if not _may_be_token(token):
        return None
    return await _current_token_by_hash(pool, _token_hash(token))


def _may_be_token(token: str) -> bool:
    return token.startswith(TOKEN_PREFIX) and len(token) <= 200


async def _current_token_by_hash(pool: asyncpg.Pool, digest: bytes) -> tuple[TokenHolder, datetime] | None:
    row = await pool.fetchrow(
        "SELECT t.label, t.office, o.name AS office_name, t.role, t.expires_at"
        "  FROM api_token t JOIN registration_office o ON o.code = t.office"
        " WHERE t.token_hash = $1 AND t.revoked_at IS NULL AND t.expires_at > now()",
        digest,
    )
    if row is None:
        return None
    return TokenHolder(row["label"], row["office"], row["office_name"], row["role"]), row["expires_at"]


TOKENS_CHANNEL = "tuo_api_tokens"  # the triggers of migrations 0025 and 0026 NOTIFY here


class TokenCache:
    """Current API tokens by hash, so a request costs no database look-up: remembered
    while ``notices`` listens on ``TOKENS_CHANNEL`` (``runtime.notices``), on which every
    change to a token or an office (a revocation, from any process) is announced. A
    token that was not found is never remembered, so a new one works at once."""

    def __init__(self, pool: asyncpg.Pool, notices: Notices) -> None:
        self._cache: NoticedCache[bytes, tuple[TokenHolder, datetime]] = notices.cache(
            TOKENS_CHANNEL,
            functools.partial(_current_token_by_hash, pool),
            fresh=lambda held: held[1] > datetime.now(UTC),
        )

    @property
    def lookups(self) -> int:
        """Database look-ups made (the rest came from memory)."""
        return self._cache.lookups

    async def holder(self, token: str) -> TokenHolder | None:
        """The system holding this token, if it is current (as ``token_holder``)."""
        if not _may_be_token(token):
            return None
        found = await self._cache.get(_token_hash(token))
        return None if found is None else found[0]


async def revoke_tokens(pool: asyncpg.Pool, label: str) -> int:
    result: str = await pool.execute(
        "UPDATE api_token SET revoked_at = now() WHERE label = $1 AND revoked_at IS NULL", label
    )
    return int(result.split()[-1])
