"""Who may do what on Kafka: one principal per component and per agency.

Least privilege, written down as data (``component_grants``, ``agency_grants``)
and applied with Kafka's own ACLs (``StandardAuthorizer``, deny unless allowed):

- the **relay** writes life events and redeliveries, and keeps its ledger;
- the **router** is the only reader of ``<prefix>.life-events``; it writes the
  agencies' topics, routing decisions and dead letters;
- the **receipt tracker** reads routing decisions and every agency's receipts;
- **replay** (``tuo replay``) writes the agencies' topics and reads none;
- **dead letters** (``tuo dlq``) reads the dead-letter topics (whole events);
- the **operators' tooling** creates topics, principals and ACLs and describes
  groups (lag); it reads no topic (ALTER on the cluster makes it as powerful as
  the super user, though: guard its password as such);
- **agency X** reads only ``<prefix>.agency.X`` in its own group
  ``<prefix>.agency.X``, writes only ``<prefix>.receipts.X`` and its own
  ``<prefix>.dead-letters.agency.X``.

Principals are named for their role, not the topic prefix: one cluster serves one
deployment of the bus. ``grant_components`` for a second prefix (the tests do this)
gives the same users access to both.

``onboard_agency`` and ``suspend_agency`` are what ``tuo agencies add`` and
``tuo agencies suspend`` do.
"""

from __future__ import annotations

import asyncio
import enum
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from runtime import kafka
from runtime.kafka_admin import (
    CLUSTER,
    AclBinding,
    Operation,
    PatternType,
    ResourceType,
    create_acls,
    delete_acls,
    delete_scram_credential,
    describe_acls,
    new_password,
    set_scram_password,
)
from runtime.settings import Settings

log = structlog.get_logger(__name__)

AGENCY_NAME = re.compile(r"^[a-z][a-z0-9-]{1,39}$")
RESERVED_NAMES = frozenset({"bus"})  # `tuo dlq` ids: `bus:…` is the shared dead-letter topic


class Principal(enum.StrEnum):
    """The bus's own components; each connects to Kafka as this user."""

    RELAY = "tuo-relay"
    ROUTER = "tuo-router"
    TRACKER = "tuo-tracker"
    OPERATOR = "tuo-operator"
    REPLAY = "tuo-replay"
    DEAD_LETTERS = "tuo-dead-letters"


def agency_principal(agency: str) -> str:
    return f"agency-{agency}"


def _user(name: str) -> str:
    return f"User:{name}"


def _allow(
    principal: str,
    resource: ResourceType,
    name: str,
    *operations: Operation,
    prefixed: bool = False,
) -> list[AclBinding]:
    pattern = PatternType.PREFIXED if prefixed else PatternType.LITERAL
    return [AclBinding(_user(principal), resource, name, pattern, op) for op in operations]


def component_grants(component: Principal, prefix: str) -> list[AclBinding]:
    """What one component may do. READ and WRITE imply DESCRIBE in Kafka."""
    topics = kafka.Topics(prefix)
    topic, group, txn = ResourceType.TOPIC, ResourceType.GROUP, ResourceType.TRANSACTIONAL_ID
    read, write, create, describe = Operation.READ, Operation.WRITE, Operation.CREATE, Operation.DESCRIBE
    p = component.value
    if component is Principal.RELAY:
        return [
            *_allow(p, topic, topics.life_events, write),
            *_allow(p, topic, topics.redeliveries, write),
            *_allow(p, topic, topics.consent_changes, write),
            # The ledger: offsets committed in the relay's transactions to a topic nobody writes.
            *_allow(p, topic, topics.relay_ledger, read),
            *_allow(p, group, f"{prefix}.relay", read),
            *_allow(p, txn, f"{prefix}.relay", write),
        ]
    if component is Principal.ROUTER:
        return [
            *_allow(p, topic, topics.life_events, read),
            *_allow(p, topic, topics.redeliveries, read),
            *_allow(p, topic, topics.consent_changes, read),
            *_allow(p, group, f"{prefix}.router", read),
            *_allow(p, txn, f"{prefix}.router.", write, prefixed=True),
            # Creates the topic of an agency subscribed since it started, and nothing else.
            *_allow(p, topic, topics.agency(""), write, create, prefixed=True),
            *_allow(p, topic, topics.routing_decisions, write),
            *_allow(p, topic, topics.dead_letters, write),
        ]
    if component is Principal.TRACKER:
        return [
            *_allow(p, topic, topics.routing_decisions, read),
            *_allow(p, topic, topics.receipts(""), read, prefixed=True),
            *_allow(p, group, f"{prefix}.receipt-tracker", read),
            *_allow(p, topic, topics.dead_letters, write),
        ]
    if component is Principal.REPLAY:
        # `tuo replay` sends stored events to the one agency named, straight to its topic;
        # it reads them from PostgreSQL, so it reads no topic at all.
        return [*_allow(p, topic, topics.agency(""), write, prefixed=True)]
    if component is Principal.DEAD_LETTERS:
        # `tuo dlq` reads dead letters, which hold whole events (personal data): its own
        # user, so that reading them is a separate grant from administering the cluster.
        # Redrives go through the outbox, so it writes nothing.
        return [*_allow(p, topic, topics.dead_letters, read, prefixed=True)]
    # Operators: topics, principals and ACLs (ALTER on the cluster), and lag. They read
    # no topic: dead letters hold whole events. ALTER on the cluster lets this user grant
    # anything, itself included, so its password is as sensitive as the super user's.
    return [
        *_allow(p, ResourceType.CLUSTER, CLUSTER, Operation.ALTER, create, describe),
        *_allow(p, topic, f"{prefix}.", describe, Operation.DESCRIBE_CONFIGS, prefixed=True),
        *_allow(p, group, f"{prefix}.", describe, prefixed=True),
    ]


def agency_grants(agency: str, prefix: str) -> list[AclBinding]:
    """An agency reads its own topic in its own group and writes its own receipts."""
    topics = kafka.Topics(prefix)
    p = agency_principal(agency)
    return [
        *_allow(p, ResourceType.TOPIC, topics.agency(agency), Operation.READ),
        *_allow(p, ResourceType.GROUP, f"{prefix}.agency.{agency}", Operation.READ),
        *_allow(p, ResourceType.TOPIC, topics.receipts(agency), Operation.WRITE),
        # The SDK reports events it cannot handle on the agency's own dead-letter topic.
        *_allow(p, ResourceType.TOPIC, topics.agency_dead_letters(agency), Operation.WRITE),
    ]


# --- The local stack's credentials file --------------------------------------------


class CredentialsFile:
    """``{"user": "password"}``, mode 0600: the local stack's Kafka passwords.

    Only the local stack keeps one (``TUO_KAFKA_CREDENTIALS_FILE``); in a real
    deployment each component gets its own ``TUO_KAFKA_SASL_USERNAME`` and password
    from the platform's secret store, and ``tuo agencies add`` prints an agency's
    password once for handing over.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in data.items()}

    def update(self, changes: dict[str, str | None]) -> None:
        """Apply ``changes`` (None removes a user), under a lock so that two commands
        updating at once both land; the file is replaced whole, never half-written."""
        lock = os.open(self.path.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.read()
            for user, password in changes.items():
                if password is None:
                    current.pop(user, None)
                else:
                    current[user] = password
            fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".credentials-")  # 0600
            with os.fdopen(fd, "w") as stream:
                json.dump(current, stream, indent=2, sort_keys=True)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)
        finally:
            os.close(lock)  # releases the lock


def credentials_file(settings: Settings) -> CredentialsFile | None:
    return CredentialsFile(settings.kafka_credentials_file) if settings.kafka_credentials_file else None


# --- Onboarding -------------------------------------------------------------------


class NotAnAgencyName(ValueError):
    def __init__(self, name: str) -> None:
        if name in RESERVED_NAMES:
            super().__init__(f"{name!r} is reserved by the bus; choose another agency name")
            return
        super().__init__(
            f"{name!r} is not an agency name: use 2 to 40 lower-case letters, digits and hyphens, "
            "starting with a letter"
        )


class AgencyExists(RuntimeError):
    def __init__(self, agency: str, status: str) -> None:
        super().__init__(
            f"{agency} is onboarded already ({status}); --reinstate gives it a new password"
            + (" and lifts the suspension" if status == "suspended" else "")
        )


class NoSuchAgency(LookupError):
    def __init__(self, agency: str) -> None:
        super().__init__(f"no agency {agency!r} has an account or a subscription; see `tuo agencies list`")


@dataclass(frozen=True)
class Onboarded:
    agency: str
    principal: str
    password: str
    topics: list[str]
    grants: list[AclBinding]
    skeleton: list[str]  # event types given a suspended subscription
    stored: bool  # the password went to the local stack's credentials file


EFFECT_TIMEOUT_SECONDS = 30.0


class NotInEffect(RuntimeError):
    """Kafka accepted a change to credentials or ACLs that has not taken effect in time."""


async def wait_for_acls(client: AIOKafkaAdminClient, principal: str, expected: Iterable[AclBinding]) -> None:
    """Until the broker holds every rule in ``expected`` for ``principal`` (or, when
    ``expected`` is empty, none at all): the controller commits a change before the
    broker applies it."""
    wanted = set(expected)
    deadline = asyncio.get_running_loop().time() + EFFECT_TIMEOUT_SECONDS
    while True:
        held = set(await describe_acls(client, principal))
        if (wanted <= held) if wanted else not held:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise NotInEffect(f"{principal} holds {len(held)} ACL rules; expected {len(wanted)}")
        await asyncio.sleep(0.1)


async def wait_until_accepted(settings: Settings, user: str, password: str) -> None:
    """Until the broker lets ``user`` in with ``password``."""
    deadline = asyncio.get_running_loop().time() + EFFECT_TIMEOUT_SECONDS
    while True:
        client = AIOKafkaAdminClient(
            **kafka.connection_options(settings, user, (user, password)), client_id="tuo-onboarding"
        )
        try:
            await client.start()
            return
        except KafkaError:
            if asyncio.get_running_loop().time() > deadline:
                raise NotInEffect(f"the broker still refuses {user}'s new password") from None
            await asyncio.sleep(0.2)
        finally:
            await client.close()


async def _admin(settings: Settings) -> AIOKafkaAdminClient:
    client = kafka.admin(settings, principal=Principal.OPERATOR)
    await client.start()
    return client


async def grant_components(settings: Settings) -> None:
    """The components' ACLs for ``settings.topic_prefix``: a second deployment of the bus
    on the same cluster, under its own prefix."""
    client = await _admin(settings)
    try:
        for component in Principal:
            grants = component_grants(component, settings.topic_prefix)
            await create_acls(client, grants)
            await wait_for_acls(client, _user(component), grants)
    finally:
        await client.close()


async def grant_full_access(settings: Settings, user: str) -> None:
    """Give ``user`` every right on a throwaway local stack, with a password kept in its
    credentials file: the tests' and benchmarks' own client, which may look at any topic
    and play a hostile client. Nothing in the bus uses it; a stack without a
    credentials file (any real deployment) refuses."""
    store = credentials_file(settings)
    if store is None:
        raise RuntimeError("full access is only for the local stack, which keeps a credentials file")
    password = new_password()
    everything = [
        AclBinding(_user(user), resource, name, PatternType.LITERAL, Operation.ALL)
        for resource, name in (
            (ResourceType.TOPIC, "*"),  # "*": every name
            (ResourceType.GROUP, "*"),
            (ResourceType.TRANSACTIONAL_ID, "*"),
            (ResourceType.CLUSTER, CLUSTER),
        )
    ]
    client = await _admin(settings)
    try:
        await set_scram_password(client, user, password)
        await create_acls(client, everything)
        await wait_for_acls(client, _user(user), everything)
    finally:
        await client.close()
    await wait_until_accepted(settings, user, password)
    store.update({user: password})


async def onboard_agency(
    settings: Settings,
    pool: asyncpg.Pool,
    agency: str,
    event_types: Iterable[str],
    *,
    by: str,
    reinstate: bool = False,
) -> Onboarded:
    """Create the agency's principal (a new password), its ACLs and topics, and a
    suspended subscription for each event type that it does not have yet.

    An agency that has an account already (active or suspended) is refused unless
    ``reinstate``: that gives it a new password (the old one stops working) and
    lifts a suspension; its subscriptions stay as they are.
    """
    if not AGENCY_NAME.match(agency) or agency in RESERVED_NAMES:
        raise NotAnAgencyName(agency)
    status = await pool.fetchval("SELECT status FROM agency_account WHERE agency = $1", agency)
    if status is not None and not reinstate:
        raise AgencyExists(agency, status)
    principal = agency_principal(agency)
    password = new_password()
    grants = agency_grants(agency, settings.topic_prefix)
    client = await _admin(settings)
    try:
        await set_scram_password(client, principal, password)
        await create_acls(client, grants)
        await wait_for_acls(client, _user(principal), grants)
    finally:
        await client.close()
    await wait_until_accepted(settings, principal, password)
    created = await kafka.ensure_topics(settings, [agency], principal=Principal.OPERATOR)
    store = credentials_file(settings)
    if store is not None:
        store.update({principal: password})
    skeleton = []
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO agency_account (agency, principal, created_by) VALUES ($1, $2, $3)"
            " ON CONFLICT (agency) DO UPDATE SET status = 'active', suspended_at = NULL,"
            " suspended_by = NULL, suspended_reason = NULL",
            agency,
            principal,
            by,
        )
        await _say_who(conn, by, "onboarded: a suspended subscription to fill in")
        for event_type in event_types:
            added = await conn.fetchval(
                "INSERT INTO subscription (agency, event_type, fields, legal_basis, status)"
                " VALUES ($1, $2, '{}', 'consent', 'suspended') ON CONFLICT DO NOTHING RETURNING id",
                agency,
                event_type,
            )
            if added is not None:
                skeleton.append(event_type)
    log.info("agency_onboarded", agency=agency, principal=principal, grants=len(grants), by=by)
    return Onboarded(agency, principal, password, created, grants, skeleton, store is not None)


async def onboard_subscribed_agencies(settings: Settings, pool: asyncpg.Pool, *, by: str) -> list[str]:
    """Onboard every agency with a subscription and no account yet (the local stack's
    demo agencies); an agency once suspended stays suspended."""
    if credentials_file(settings) is None:
        return []  # only the local stack keeps agencies' passwords; elsewhere `tuo agencies add`
    new = await pool.fetch(
        "SELECT DISTINCT s.agency FROM subscription s"
        " WHERE NOT EXISTS (SELECT 1 FROM agency_account a WHERE a.agency = s.agency) ORDER BY 1"
    )
    for row in new:
        await onboard_agency(settings, pool, row["agency"], [], by=by)
    return [row["agency"] for row in new]


@dataclass(frozen=True)
class Suspended:
    agency: str
    acls_removed: int
    credential_removed: bool
    subscriptions_suspended: int


async def suspend_agency(
    settings: Settings, pool: asyncpg.Pool, agency: str, *, reason: str, by: str
) -> Suspended:
    """Cut the agency off now: its ACLs go first (every request it makes from then on
    is refused, on connections already open too), then its password, then the
    router stops routing to it. Suspending it again does no harm."""
    known = await pool.fetchval(
        "SELECT EXISTS (SELECT 1 FROM agency_account WHERE agency = $1)"
        " OR EXISTS (SELECT 1 FROM subscription WHERE agency = $1)",
        agency,
    )
    if not known:
        raise NoSuchAgency(agency)
    principal = agency_principal(agency)
    client = await _admin(settings)
    try:
        removed = await delete_acls(client, _user(principal))
        await wait_for_acls(client, _user(principal), [])
        credential = await delete_scram_credential(client, principal)
    finally:
        await client.close()
    store = credentials_file(settings)
    if store is not None:
        store.update({principal: None})
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO agency_account (agency, principal, created_by, status, suspended_at,"
            " suspended_by, suspended_reason) VALUES ($1, $2, $3, 'suspended', now(), $3, $4)"
            " ON CONFLICT (agency) DO UPDATE SET status = 'suspended', suspended_at = now(),"
            " suspended_by = $3, suspended_reason = $4",
            agency,
            principal,
            by,
            reason,
        )
        await _say_who(conn, by, f"the agency was suspended: {reason}")
        status = await conn.execute(
            "UPDATE subscription SET status = 'suspended' WHERE agency = $1 AND status = 'active'", agency
        )
    log.warning("agency_suspended", agency=agency, acls_removed=removed, by=by)
    return Suspended(agency, removed, credential, int(status.split()[-1]))


async def _say_who(conn: asyncpg.Connection, by: str, reason: str) -> None:
    """Who changes subscriptions in this transaction, and why: for the version that
    migration 0035's trigger records (as router.subscription_versions.say_who does)."""
    await conn.execute(
        "SELECT set_config('tuo.changed_by', $1, true), set_config('tuo.change_reason', $2, true)", by, reason
    )


async def agency_acls(settings: Settings, agency: str) -> list[AclBinding]:
    client = await _admin(settings)
    try:
        return await describe_acls(client, _user(agency_principal(agency)))
    finally:
        await client.close()
