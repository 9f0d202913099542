"""Kafka security against the real broker: SASL/SCRAM-SHA-512 over TLS, deny by
default, least privilege per component and per agency, onboarding and suspension."""

from __future__ import annotations

import asyncio
import secrets
import ssl
import string
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka.admin import NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
)
from cryptography.hazmat.primitives import serialization

from devstack.certificates import new_certificate_authority
from router.store import set_subscription_status
from runtime import kafka
from runtime.access import (
    AgencyExists,
    NoSuchAgency,
    Principal,
    agency_principal,
    credentials_file,
    onboard_agency,
    suspend_agency,
)
from runtime.kafka import Topics
from runtime.settings import Settings
from tests.support import inspector_producer, read_topic, tuo_cli

pytestmark = pytest.mark.integration

AUTHORISATION_ERRORS = (TopicAuthorizationFailedError, GroupAuthorizationFailedError)


def _agency_name(prefix: str) -> str:
    # Letters only: a hex suffix can spell a postcode ("sec-s-ba16be"), which the log
    # redaction then rightly hides, and later tests that read the logs stumble on it.
    return f"{prefix}-{''.join(secrets.choice(string.ascii_lowercase) for _ in range(6))}"


@pytest.fixture(scope="module")
async def two_agencies(services: Settings, pool: asyncpg.Pool) -> AsyncIterator[tuple[str, str]]:
    """Agencies A and B, onboarded, each with one message waiting on its topic."""
    a, b = _agency_name("sec-a"), _agency_name("sec-b")
    for agency in (a, b):
        await onboard_agency(services, pool, agency, [], by="tests")
    topics = Topics(services.topic_prefix)
    producer = inspector_producer(services)
    await producer.start()
    try:
        for agency in (a, b):
            await producer.send_and_wait(topics.agency(agency), b"for " + agency.encode())
    finally:
        await producer.stop()
    yield a, b


async def _fetch(settings: Settings, principal: str, topic: str, group_id: str | None) -> list[bytes]:
    """Everything on ``topic``, read as ``principal`` (in ``group_id``, if given)."""
    consumer = kafka.consumer(
        settings, topic, principal=principal, group_id=group_id, client_id="security-test"
    )
    try:
        await consumer.start()
        batches = await consumer.getmany(timeout_ms=5000)
        return [record.value or b"" for records in batches.values() for record in records]
    finally:
        await consumer.stop()


async def _produce(settings: Settings, principal: str, topic: str) -> None:
    producer = kafka.producer(settings, principal=principal, client_id="security-test")
    try:
        await producer.start()
        await producer.send_and_wait(topic, b"written by " + principal.encode())
    finally:
        await producer.stop()


async def test_an_agency_reads_its_own_topic_in_its_own_group_and_writes_its_own_receipts(
    services: Settings, two_agencies: tuple[str, str]
) -> None:
    a, _ = two_agencies
    topics = Topics(services.topic_prefix)
    got = await _fetch(services, agency_principal(a), topics.agency(a), f"{services.topic_prefix}.agency.{a}")
    assert got == [b"for " + a.encode()]
    await _produce(services, agency_principal(a), topics.receipts(a))
    assert [r.value for r in await read_topic(services, topics.receipts(a))] == [
        b"written by " + agency_principal(a).encode()
    ]


async def test_agency_a_cannot_read_agency_b_topic(services: Settings, two_agencies: tuple[str, str]) -> None:
    a, b = two_agencies
    with pytest.raises(TopicAuthorizationFailedError):
        await _fetch(
            services,
            agency_principal(a),
            Topics(services.topic_prefix).agency(b),
            f"{services.topic_prefix}.agency.{a}",
        )


async def test_agency_a_cannot_write_agency_b_receipts(
    services: Settings, two_agencies: tuple[str, str]
) -> None:
    a, b = two_agencies
    with pytest.raises(TopicAuthorizationFailedError):
        await _produce(services, agency_principal(a), Topics(services.topic_prefix).receipts(b))
    assert await read_topic(services, Topics(services.topic_prefix).receipts(b)) == [], "nothing was written"


async def test_agency_a_cannot_read_the_life_events(
    services: Settings, two_agencies: tuple[str, str]
) -> None:
    a, _ = two_agencies
    with pytest.raises(TopicAuthorizationFailedError):
        await _fetch(
            services,
            agency_principal(a),
            Topics(services.topic_prefix).life_events,
            f"{services.topic_prefix}.agency.{a}",
        )


async def test_agency_a_cannot_join_agency_b_consumer_group(
    services: Settings, two_agencies: tuple[str, str]
) -> None:
    a, b = two_agencies
    with pytest.raises(GroupAuthorizationFailedError):
        await _fetch(
            services,
            agency_principal(a),
            Topics(services.topic_prefix).agency(a),
            f"{services.topic_prefix}.agency.{b}",
        )


@pytest.mark.parametrize(
    ("principal", "topic", "action"),
    [
        (Principal.RELAY, "life_events", "read"),
        (Principal.TRACKER, "life_events", "read"),
        (Principal.OPERATOR, "life_events", "read"),
        (Principal.OPERATOR, "agency:hmrc", "read"),
        (Principal.TRACKER, "agency:hmrc", "read"),
        (Principal.ROUTER, "receipts:hmrc", "write"),
        (Principal.ROUTER, "routing_decisions", "read"),
        (Principal.TRACKER, "life_events", "write"),
        (Principal.OPERATOR, "life_events", "write"),
        ("agency-hmrc", "routing_decisions", "read"),
        ("agency-hmrc", "dead_letters", "read"),
        ("agency-hmrc", "dead_letters", "write"),
        ("agency-hmrc", "agency_dead_letters:dwp", "write"),
        (Principal.ROUTER, "life_events", "write"),
        (Principal.OPERATOR, "dead_letters", "read"),
    ],
)
async def test_each_component_is_refused_what_its_job_does_not_need(
    services: Settings, principal: str, topic: str, action: str
) -> None:
    topics = Topics(services.topic_prefix)
    kind, _, agency = topic.partition(":")
    name = getattr(topics, kind)(agency) if agency else getattr(topics, kind)
    # A principal with no WRITE anywhere cannot even start an idempotent producer.
    with pytest.raises((TopicAuthorizationFailedError, ClusterAuthorizationFailedError)):
        if action == "read":
            await _fetch(services, principal, name, None)
        else:
            await _produce(services, principal, name)


def _broker_address(settings: Settings) -> tuple[str, int]:
    host, port = settings.require_bootstrap_servers().split(",")[0].rsplit(":", 1)
    return host, int(port)


async def _connect(settings: Settings, **options: Any) -> None:
    host, port = _broker_address(settings)
    conn = await create_conn(host, port, request_timeout_ms=5000, **options)
    conn.close()


async def test_the_right_password_over_tls_connects(services: Settings) -> None:
    user, password = services.kafka_credentials(Principal.OPERATOR) or ("", "")
    await _connect(
        services,
        security_protocol="SASL_SSL",
        ssl_context=ssl.create_default_context(cafile=str(services.kafka_ssl_cafile)),
        sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username=user,
        sasl_plain_password=password,
    )


async def test_a_wrong_password_is_refused(services: Settings) -> None:
    with pytest.raises(SaslAuthenticationFailed, match="invalid credentials"):
        await _connect(
            services,
            security_protocol="SASL_SSL",
            ssl_context=ssl.create_default_context(cafile=str(services.kafka_ssl_cafile)),
            sasl_mechanism="SCRAM-SHA-512",
            sasl_plain_username=str(Principal.ROUTER),
            sasl_plain_password="not-the-password",
        )


async def test_a_client_that_does_not_trust_the_broker_ca_cannot_connect(
    services: Settings, tmp_path: Path
) -> None:
    _, stranger = new_certificate_authority(datetime.now(UTC))
    untrusted = tmp_path / "untrusted-ca.pem"
    untrusted.write_bytes(stranger.public_bytes(serialization.Encoding.PEM))
    user, password = services.kafka_credentials(Principal.OPERATOR) or ("", "")
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        await _connect(
            services,
            security_protocol="SASL_SSL",
            ssl_context=ssl.create_default_context(cafile=str(untrusted)),
            sasl_mechanism="SCRAM-SHA-512",
            sasl_plain_username=user,
            sasl_plain_password=password,
        )


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SASL_PLAINTEXT"])
async def test_a_connection_without_tls_fails(services: Settings, protocol: str) -> None:
    user, password = services.kafka_credentials(Principal.OPERATOR) or ("", "")
    sasl = {"sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": user, "sasl_plain_password": password}
    client = kafka.AIOKafkaProducer(
        bootstrap_servers=services.require_bootstrap_servers(),
        security_protocol=protocol,
        request_timeout_ms=5000,
        **(sasl if protocol == "SASL_PLAINTEXT" else {}),
    )
    with pytest.raises(KafkaConnectionError):
        await client.start()
    await client.stop()


def test_the_broker_has_no_plaintext_listener_and_denies_what_no_acl_allows(services: Settings) -> None:
    properties = (services.state_dir / "kafka" / "server.properties").read_text()
    listeners = next(line for line in properties.splitlines() if line.startswith("listeners="))
    assert "PLAINTEXT://" not in listeners.replace("SASL_SSL", "")
    assert "listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:SSL" in properties
    assert "listener.name.controller.ssl.client.auth=required" in properties
    assert "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer" in properties
    assert "allow.everyone.if.no.acl.found=false" in properties
    for secret in (
        services.state_dir / "kafka" / "server.properties",
        services.state_dir / "kafka" / "tls" / "broker.p12",
        services.state_dir / "kafka" / "tls" / "ca.key",
        services.kafka_credentials_file,
    ):
        assert secret is not None and secret.stat().st_mode & 0o077 == 0, f"{secret} is readable by others"


async def _refused(attempt: Callable[[], Awaitable[object]]) -> KafkaError:
    try:
        await attempt()
    except KafkaError as exc:
        return exc
    raise AssertionError("the attempt succeeded")


async def test_a_suspended_agency_is_cut_off_at_once(services: Settings, pool: asyncpg.Pool) -> None:
    agency = _agency_name("sec-s")
    await onboard_agency(services, pool, agency, ["DeathRegistered"], by="tests")
    await set_subscription_status(pool, agency, "DeathRegistered", "active")
    topics = Topics(services.topic_prefix)
    principal = agency_principal(agency)
    password = (credentials_file(services) or pytest.fail("no credentials file")).read()[principal]
    # Connected and working before: a consumer in its group and a producer of receipts.
    consumer = kafka.consumer(
        services,
        topics.agency(agency),
        principal=principal,
        group_id=f"{services.topic_prefix}.agency.{agency}",
        client_id="suspended",
    )
    producer = kafka.producer(services, principal=principal, client_id="suspended")
    await consumer.start()
    await producer.start()
    try:
        await consumer.getmany(timeout_ms=2000)
        await producer.send_and_wait(topics.receipts(agency), b"before")

        done = await suspend_agency(services, pool, agency, reason="security test", by="tests")
        assert done.acls_removed == 4 and done.credential_removed and done.subscriptions_suspended == 1

        # The very next request on the connections already open is refused.
        write = await _refused(lambda: producer.send_and_wait(topics.receipts(agency), b"after"))
        assert isinstance(write, TopicAuthorizationFailedError), repr(write)
        read = await _refused(lambda: consumer.getmany(timeout_ms=5000, max_records=1))
        assert isinstance(read, AUTHORISATION_ERRORS), repr(read)
    finally:
        await producer.stop()
        await consumer.stop()
    # And its password no longer opens a connection.
    with pytest.raises(SaslAuthenticationFailed):
        await _connect(
            services,
            security_protocol="SASL_SSL",
            ssl_context=ssl.create_default_context(cafile=str(services.kafka_ssl_cafile)),
            sasl_mechanism="SCRAM-SHA-512",
            sasl_plain_username=principal,
            sasl_plain_password=password,
        )
    assert [r.value for r in await read_topic(services, topics.receipts(agency))] == [b"before"]
    row = await pool.fetchrow(
        "SELECT status, suspended_by, suspended_reason FROM agency_account WHERE agency = $1", agency
    )
    assert dict(row) == {"status": "suspended", "suspended_by": "tests", "suspended_reason": "security test"}
    assert await pool.fetchval("SELECT status FROM subscription WHERE agency = $1", agency) == "suspended"


async def test_tuo_agencies_add_onboards_and_suspend_cuts_off(services: Settings, pool: asyncpg.Pool) -> None:
    agency = _agency_name("sec-cli")
    code, output = await asyncio.to_thread(
        tuo_cli, services, "agencies", "add", agency, "--event-type", "DeathRegistered", "--by", "ops-test"
    )
    assert code == 0, output
    assert f"agency-{agency}" in output and "4 ACL rules" in output
    assert f"READ TOPIC:{services.topic_prefix}.agency.{agency}" in output
    assert f"WRITE TOPIC:{services.topic_prefix}.receipts.{agency}" in output
    assert "Suspended subscriptions to fill in: DeathRegistered" in output
    assert "Password (shown once" not in output, "the local stack keeps it in its credentials file"
    rows = await pool.fetch("SELECT event_type, status, fields FROM subscription WHERE agency = $1", agency)
    assert [(r["event_type"], r["status"], r["fields"]) for r in rows] == [
        ("DeathRegistered", "suspended", [])
    ]
    topics = Topics(services.topic_prefix)
    # The new agency can use its topic with the password the command stored.
    await _produce(services, agency_principal(agency), topics.receipts(agency))

    code, output = await asyncio.to_thread(
        tuo_cli, services, "agencies", "suspend", agency, "--reason", "contract ended", "--by", "ops-test"
    )
    assert code == 0, output
    assert "4 ACL rules removed" in output and "password removed" in output
    code, output = await asyncio.to_thread(tuo_cli, services, "agencies", "list")
    line = next(line for line in output.splitlines() if agency in line)
    assert "suspended" in line and "contract ended" in line
    assert agency_principal(agency) not in (credentials_file(services) or pytest.fail("no file")).read()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["agencies", "add", "Bad Name"], "is not an agency name"),
        (["agencies", "add", "x"], "is not an agency name"),
        (["agencies", "add", "a" * 41], "is not an agency name"),
        (["agencies", "add", "bus"], "is reserved by the bus"),
        (["agencies", "add", "ok-agency", "--event-type", "Nope"], "not an event type"),
        (["agencies", "add", "hmrc"], "onboarded already (active); --reinstate"),
        (["agencies", "suspend", "nobody-here", "--reason", "typo"], "no agency 'nobody-here'"),
        (["agencies", "suspend", "hmrc", "--reason", "x"], "reason of 3 to 500"),
        (["agencies", "suspend", "hmrc"], "Missing option"),
    ],
)
async def test_agencies_commands_refuse_bad_input_clearly(
    services: Settings, pool: asyncpg.Pool, args: list[str], message: str
) -> None:
    before = await pool.fetchval("SELECT count(*) FROM agency_account")
    code, output = await asyncio.to_thread(tuo_cli, services, *args)
    assert code != 0 and message in output, output
    assert await pool.fetchval("SELECT count(*) FROM agency_account") == before, "nothing was written"


async def test_an_agency_cannot_create_topics(services: Settings) -> None:
    client = kafka.admin(services, principal=agency_principal("hmrc"))
    await client.start()
    try:
        response = await client.create_topics([NewTopic(f"{services.topic_prefix}.agency.hmrc-extra", 1, 1)])
    finally:
        await client.close()
    [(_, code, *_)] = response.topic_errors
    assert code == TopicAuthorizationFailedError.errno


async def test_suspending_twice_or_an_unknown_agency_is_safe_and_clear(
    services: Settings, pool: asyncpg.Pool
) -> None:
    agency = _agency_name("sec-t")
    await onboard_agency(services, pool, agency, [], by="tests")
    first = await suspend_agency(services, pool, agency, reason="first", by="tests")
    again = await suspend_agency(services, pool, agency, reason="again", by="tests")
    assert (first.acls_removed, first.credential_removed) == (4, True)
    assert (again.acls_removed, again.credential_removed) == (0, False), "nothing left to remove"
    reason = await pool.fetchval("SELECT suspended_reason FROM agency_account WHERE agency = $1", agency)
    assert reason == "again"
    with pytest.raises(NoSuchAgency, match="no agency 'sec-nobody'"):
        await suspend_agency(services, pool, "sec-nobody", reason="typo", by="tests")


async def test_onboarding_an_existing_agency_needs_reinstate_which_replaces_its_password(
    services: Settings, pool: asyncpg.Pool
) -> None:
    agency = _agency_name("sec-r")
    first = await onboard_agency(services, pool, agency, [], by="tests")
    await suspend_agency(services, pool, agency, reason="paused", by="tests")
    with pytest.raises(AgencyExists, match="suspended"):
        await onboard_agency(services, pool, agency, [], by="tests")
    second = await onboard_agency(services, pool, agency, [], by="tests", reinstate=True)
    assert second.password != first.password
    status = await pool.fetchval("SELECT status FROM agency_account WHERE agency = $1", agency)
    assert status == "active"
    await _produce(services, agency_principal(agency), Topics(services.topic_prefix).receipts(agency))
    with pytest.raises(SaslAuthenticationFailed):
        await _connect(
            services,
            security_protocol="SASL_SSL",
            ssl_context=ssl.create_default_context(cafile=str(services.kafka_ssl_cafile)),
            sasl_mechanism="SCRAM-SHA-512",
            sasl_plain_username=agency_principal(agency),
            sasl_plain_password=first.password,
        )
