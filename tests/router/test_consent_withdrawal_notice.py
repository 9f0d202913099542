"""A withdrawal reaches the agencies that already hold the data, over the real bus
(Kafka, PostgreSQL, relay, router, reference agencies, receipt tracker) and the
citizens' pages: the agency that was sent an event under consent is told, signed,
and answers with a receipt the citizen sees; an agency sent nothing under that
consent is told nothing; a forged or unsigned consent change is dead-lettered by
the router and by the agency SDK, and never applied."""

from __future__ import annotations

import html
import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest
from aiokafka.structs import ConsumerRecord
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI

from citizens.pages import install_citizen_pages
from citizens.proxies import appoint_proxy_by_nino
from devstack.dev_idp import TEST_IDENTITIES
from router import audit
from router.consent_changes import consent_changed_message, holders, record_consent_change
from router.consent_receipts import ConsentSigningKey, consent_receipt_keys_router, consent_signer
from router.organisations import agency_name
from runtime.kafka import Topics
from runtime.keyring import HttpConsentKeySource, KeyRegistryUnavailable, KeyRing
from runtime.pseudonyms import subject_id_for
from runtime.settings import Settings
from schemas import decode, encode, models
from schemas.cloudevents import headers_for
from schemas.consent_signatures import CONSENT_SERVICE, ConsentSigner, verify_consent_change
from schemas.signatures import MANIFEST_HEADER, SIGNATURE_HEADERS, read_signature
from tests.citizen_browser import Stack, browser, serve_citizens, sign_in, whoami
from tests.support import (
    death_message,
    death_registration,
    eventually,
    header,
    inspector_producer,
    office_key,
    random_nino,
    read_topic,
    today,
)

pytestmark = pytest.mark.integration

# Known to no reference agency, so registering her death changes none of the demo's
# records that other tests rely on.
_, CHRIS, AMARA = TEST_IDENTITIES  # Chris acts for Amara as her proxy


@pytest.fixture(scope="module")
async def stack(services: Settings, pool: asyncpg.Pool) -> AsyncIterator[Stack]:
    async with serve_citizens(services, pool, install_citizen_pages) as (base_url, idp, settings):
        yield Stack(base_url, idp, settings)


def text_of(page: str) -> str:
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


async def change_consent(
    client: httpx.AsyncClient,
    stack: Stack,
    csrf: str,
    subject_id: str,
    agency: str,
    event_type: str,
    choice: str,
) -> httpx.Response:
    form = {
        "csrf_token": csrf,
        "subject_id": subject_id,
        "agency": agency,
        "event_type": event_type,
        "choice": choice,
    }
    return await client.post(f"{stack.base_url}/citizen/consents", data=form)


async def latest_change_id(
    pool: asyncpg.Pool, subject_id: str, agency: str, event_type: str
) -> uuid.UUID | None:
    change_id: uuid.UUID | None = await pool.fetchval(
        "SELECT change_id FROM consent_record WHERE subject_id = $1 AND agency = $2 AND event_type = $3"
        " ORDER BY id DESC LIMIT 1",
        subject_id,
        agency,
        event_type,
    )
    return change_id


async def notice(pool: asyncpg.Pool, change_id: uuid.UUID, agency: str) -> bool | None:
    told: bool | None = await pool.fetchval(
        "SELECT told FROM consent_notice WHERE change_id = $1 AND agency = $2", change_id, agency
    )
    return told


async def applied_by(pool: asyncpg.Pool, change_id: uuid.UUID, agency: str) -> bool:
    """Whether the agency's receipt says it applied the change."""
    return bool(
        await pool.fetchval(
            "SELECT 1 FROM delivery_receipt WHERE event_id = $1 AND agency = $2 AND outcome = 'APPLIED'",
            change_id,
            agency,
        )
    )


def with_id(records: list[ConsumerRecord[bytes, bytes]], ce_id: str) -> list[ConsumerRecord[bytes, bytes]]:
    return [r for r in records if header(r, "ce_id") == ce_id]


async def test_a_withdrawal_after_delivery_reaches_the_agency_which_receipts_it_and_the_citizen_sees_it(
    stack: Stack, services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    topics = Topics(services.topic_prefix)
    amara = subject_id_for(AMARA.nino, services.require_pseudonym_key())
    # The informant consents to DVLA at the desk and refuses HM Passport Office.
    body = death_registration(
        deceased={
            "given_names": AMARA.given_name,
            "family_name": AMARA.family_name,
            "date_of_birth": AMARA.birth_date,
            "nino": AMARA.nino,
        }
    )
    answer = await intake.post("/v1/death-registrations", json=body)
    assert answer.status_code == 201, answer.text
    event_id = await pool.fetchval(
        "SELECT event_id FROM intake_record WHERE reference = $1", answer.json()["reference"]
    )

    async def dvla_has_it() -> bool:
        # Delivered under consent, and DVLA's own store has it (its final receipt is in).
        return bool(
            await pool.fetchval(
                "SELECT count(*) FROM routing_decision d JOIN delivery_receipt r USING (event_id, agency)"
                " WHERE d.event_id = $1 AND d.agency = 'dvla' AND d.outcome = 'DELIVERED'"
                "   AND d.legal_basis = 'consent' AND r.outcome IN ('APPLIED', 'REJECTED')",
                event_id,
            )
        )

    await eventually(dvla_has_it, timeout=90, what="DVLA's delivery under consent and its receipt")

    async with browser() as client:
        assert (await sign_in(client, stack, AMARA.sub)).status_code == 303
        csrf = (await whoami(client, stack)).json()["csrf"]
        withdrawn = await change_consent(client, stack, csrf, amara, "dvla", "DeathRegistered", "no")
        assert withdrawn.status_code == 200, withdrawn.text
        assert "we will tell them you have withdrawn it" in text_of(withdrawn.text)
        # HM Passport Office was refused at the desk, so never sent it: given, then withdrawn.
        for choice in ("given", "no"):
            assert (
                await change_consent(client, stack, csrf, amara, "hmpo", "DeathRegistered", choice)
            ).status_code == 200
        # Leeds is sent deaths by statute, and was sent no change of address under consent.
        for choice in ("given", "no"):
            assert (
                await change_consent(client, stack, csrf, amara, "council-leeds", "AddressChanged", choice)
            ).status_code == 200

    to_dvla = await latest_change_id(pool, amara, "dvla", "DeathRegistered")
    to_hmpo = await latest_change_id(pool, amara, "hmpo", "DeathRegistered")
    to_leeds = await latest_change_id(pool, amara, "council-leeds", "AddressChanged")
    assert to_dvla and to_hmpo and to_leeds, "every withdrawal is written to be passed on"
    assert (
        await pool.fetchval("SELECT topic FROM outbox WHERE event_id = $1", to_dvla) == topics.consent_changes
    ), "written to the outbox with the consent record"

    async def dvla_answered() -> str | None:
        outcome: str | None = await pool.fetchval(
            "SELECT outcome FROM delivery_receipt WHERE event_id = $1 AND agency = 'dvla'"
            " AND outcome IN ('APPLIED', 'REJECTED')",
            to_dvla,
        )
        return outcome

    assert await eventually(dvla_answered, timeout=60, what="DVLA's receipt for the withdrawal") == "APPLIED"
    assert await notice(pool, to_dvla, "dvla") is True
    await eventually(
        lambda: _both_answered(pool, to_hmpo, to_leeds),
        timeout=60,
        what="the router's answer for hmpo and Leeds",
    )
    assert await notice(pool, to_hmpo, "hmpo") is False
    assert await notice(pool, to_leeds, "council-leeds") is False

    # DVLA got the consent service's signed message, once, on its own topic ...
    told = with_id(await read_topic(services, topics.agency("dvla")), str(to_dvla))
    assert len(told) == 1
    assert header(told[0], "ce_type") == "uk.gov.tellusonce.ConsentChanged"
    assert header(told[0], "ce_source") == "/consent"
    assert all(header(told[0], name) for name in SIGNATURE_HEADERS)
    # ... and stopped processing what it had been sent under that consent.
    stopped = await pool.fetchrow(
        "SELECT subject_id, event_type, choice, recorded_by, events_stopped FROM agency.consent_withdrawal"
        " WHERE agency = 'dvla' AND change_id = $1",
        to_dvla,
    )
    assert stopped is not None and dict(stopped) == {
        "subject_id": amara,
        "event_type": "DeathRegistered",
        "choice": "WITHDRAWN",
        "recorded_by": "CITIZEN",
        "events_stopped": stopped["events_stopped"],
    }
    assert stopped["events_stopped"] >= 1
    assert (
        await pool.fetchval(
            "SELECT change_id FROM agency.consent_stopped WHERE agency = 'dvla' AND event_id = $1", event_id
        )
        == to_dvla
    ), "the death DVLA was sent under that consent is no longer processed"
    # The agencies sent nothing under those consents were told nothing, and answered nothing.
    assert with_id(await read_topic(services, topics.agency("hmpo")), str(to_hmpo)) == []
    assert with_id(await read_topic(services, topics.agency("council-leeds")), str(to_leeds)) == []
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM delivery_receipt WHERE event_id = ANY($1::uuid[])", [to_hmpo, to_leeds]
        )
        == 0
    )

    async with browser() as client:
        assert (await sign_in(client, stack, AMARA.sub)).status_code == 303
        history = text_of((await client.get(f"{stack.base_url}/citizen/history")).text)
        download = (await client.get(f"{stack.base_url}/citizen/download")).json()
    assert "Telling the organisation" in history
    assert (
        "Driver and Vehicle Licensing Agency was told, and confirmed they have stopped using it." in history
    )
    assert (
        "HM Passport Office had not been sent any of this information with your consent, "
        "so there was nothing to tell them." in history
    )
    assert (
        f"{agency_name('council-leeds')} had not been sent any of this information with your consent"
        in history
    )
    dvla_change = next(
        c for c in download["consent_history"] if c["agency"] == "dvla" and c["choice"] == "withdrawn"
    )
    assert (dvla_change["agency_notice"], dvla_change["agency_receipt"]) == ("told", "applied")


async def _both_answered(pool: asyncpg.Pool, to_hmpo: uuid.UUID, to_leeds: uuid.UUID) -> bool:
    return (
        await notice(pool, to_hmpo, "hmpo") is not None
        and await notice(pool, to_leeds, "council-leeds") is not None
    )


# --- hostile consent changes ---------------------------------------------------------------------


def signed_change(
    settings: Settings, signer: ConsentSigner, agency: str, subject_id: str | None = None
) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    change_id = uuid.uuid4()
    value, headers = consent_changed_message(
        settings,
        signer,
        change_id=change_id,
        subject_id=subject_id or f"n-{uuid.uuid4().hex}",
        agency=agency,
        event_type="DeathRegistered",
        choice="withdrawn",
        recorded_by="citizen",
        recorded_at=datetime.now(UTC),
    )
    return str(change_id), value, headers


def unsigned(headers: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    return [(k, v) for k, v in headers if k not in SIGNATURE_HEADERS]


async def hostile_changes(
    services: Settings, pool: asyncpg.Pool, agency: str
) -> tuple[
    dict[str, tuple[bytes | None, list[tuple[str, bytes]]]], tuple[str, bytes, list[tuple[str, bytes]]]
]:
    """Messages claiming to be consent changes for ``agency`` that the consent service
    did not make (by what is wrong with them), and one genuine change."""
    genuine_key = await consent_signer(pool, services)
    forged_key = ConsentSigningKey(genuine_key.key_id, Ed25519PrivateKey.generate())  # its id, not its key
    hostile: dict[str, tuple[bytes | None, list[tuple[str, bytes]]]] = {}
    _, value, headers = signed_change(services, genuine_key, agency)
    hostile["unsigned"] = (value, unsigned(headers))
    _, value, headers = signed_change(services, forged_key, agency)
    hostile["forged"] = (value, headers)
    _, value, headers = signed_change(services, await office_key(pool, services), agency)
    hostile["signed by an office"] = (value, headers)
    change_id, value, headers = signed_change(services, genuine_key, agency)
    _, other, _ = signed_change(services, genuine_key, agency)  # another subject's change, same id below
    tampered = encode("ConsentChanged", {**_decoded(other), "change_id": change_id})
    hostile["altered"] = (tampered, headers)
    _, value, headers = signed_change(services, genuine_key, agency)
    hostile["oversized"] = (value, [(k, b"x" * 300_000 if k == MANIFEST_HEADER else v) for k, v in headers])
    _, _, headers = signed_change(services, genuine_key, agency)
    hostile["not Avro"] = (b"\x00\x00\x00\x00\x08not avro at all", headers)
    _, value, _ = signed_change(services, genuine_key, agency)
    hostile["no CloudEvents headers"] = (value, [])
    _, _, headers = signed_change(services, genuine_key, agency)
    hostile["no value"] = (None, headers)
    return hostile, signed_change(services, genuine_key, agency)


def _decoded(value: bytes) -> dict[str, object]:
    return decode(value)[1]


def dead_letter_reasons(records: list[ConsumerRecord[bytes, bytes]]) -> dict[bytes, str]:
    """Dead letters by their message key (each hostile message has its own, since some
    lack a ce_id or a value): the reason given."""
    return {bytes(r.key or b""): header(r, "tuo_dlq_reason") or "" for r in records}


def hostile_key(why: str) -> bytes:
    return f"hostile/{why}/{uuid.uuid4()}".encode()


async def test_the_agency_sdk_dead_letters_a_forged_or_unsigned_consent_change_and_applies_none(
    services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    topics = Topics(services.topic_prefix)
    hostile, (genuine_id, value, headers) = await hostile_changes(services, pool, "dvla")
    # A genuine change for another agency, put on DVLA's topic.
    _, for_hmrc, hmrc_headers = signed_change(services, await consent_signer(pool, services), "hmrc")
    hostile["for another agency"] = (for_hmrc, hmrc_headers)
    keys = {why: hostile_key(why) for why in hostile}
    producer = inspector_producer(services)
    await producer.start()
    try:
        for why, (hostile_value, hostile_headers) in hostile.items():
            await producer.send_and_wait(
                topics.agency("dvla"), hostile_value, key=keys[why], headers=hostile_headers
            )
        await producer.send_and_wait(topics.agency("dvla"), value, key=b"x", headers=headers)
    finally:
        await producer.stop()

    async def applied() -> bool:
        return await applied_by(pool, uuid.UUID(genuine_id), "dvla")

    await eventually(applied, timeout=60, what="the genuine change applied after the hostile ones")
    letters = dead_letter_reasons(await read_topic(services, topics.agency_dead_letters("dvla")))
    reasons = {why: letters.get(keys[why], "") for why in hostile}
    assert all(reasons.values()), f"every hostile message is dead-lettered: {reasons}"
    assert "unsigned" in reasons["unsigned"]
    assert "does not verify" in reasons["forged"]
    assert "not a consent service key" in reasons["signed by an office"]
    assert "digest mismatch" in reasons["altered"]
    assert "bytes" in reasons["oversized"]
    assert "for 'hmrc' reached 'dvla'" in reasons["for another agency"]
    # None reached DVLA's handler: only the genuine change was recorded or receipted.
    hostile_ids = [header_id for _, h in hostile.values() if (header_id := _ce_id(h))]
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM agency.consent_withdrawal WHERE change_id = ANY($1::uuid[])", hostile_ids
        )
        == 0
    )
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM delivery_receipt WHERE event_id = ANY($1::uuid[])", hostile_ids
        )
        == 0
    )
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM agency.consent_withdrawal WHERE change_id = $1", uuid.UUID(genuine_id)
        )
        == 1
    )


def _ce_id(headers: list[tuple[str, bytes]]) -> str | None:
    return next((v.decode() for k, v in headers if k == "ce_id"), None)


async def test_the_router_passes_on_no_forged_consent_change_and_records_a_genuine_one(
    services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    topics = Topics(services.topic_prefix)
    hostile, (genuine_id, value, headers) = await hostile_changes(services, pool, "dvla")
    # A life event is not a consent change, even on the right topic and signed by its office.
    event_id, death, death_headers = death_message(
        f"n-{uuid.uuid4().hex}", key=await office_key(pool, services)
    )
    hostile["a life event"] = (death, death_headers)
    # A consent change's value under life-event headers claiming another type.
    _, change, change_headers = signed_change(services, await consent_signer(pool, services), "dvla")
    retyped = [(k, b"uk.gov.tellusonce.DeathRegistered" if k == "ce_type" else v) for k, v in change_headers]
    hostile["another type"] = (change, retyped)
    keys = {why: hostile_key(why) for why in hostile}
    producer = inspector_producer(services)
    await producer.start()
    try:
        for why, (hostile_value, hostile_headers) in hostile.items():
            await producer.send_and_wait(
                topics.consent_changes, hostile_value, key=keys[why], headers=hostile_headers
            )
        await producer.send_and_wait(topics.consent_changes, value, key=b"x", headers=headers)
    finally:
        await producer.stop()

    # The genuine one is answered (nobody holds that made-up subject's data: not told).
    async def answered() -> bool:
        return await notice(pool, uuid.UUID(genuine_id), "dvla") is not None

    await eventually(answered, timeout=60, what="the router's answer for the genuine change")
    assert await notice(pool, uuid.UUID(genuine_id), "dvla") is False

    # The hostile messages sit on other partitions, each routed in its own transaction.
    async def reasons_now() -> dict[str, str]:
        letters = dead_letter_reasons(
            [
                r
                for r in await read_topic(services, topics.dead_letters)
                if header(r, "tuo_dlq_topic") == topics.consent_changes
            ]
        )
        return {why: letters.get(keys[why], "") for why in hostile}

    async def all_dead_lettered() -> dict[str, str] | None:
        found = await reasons_now()
        return found if all(found.values()) else None

    try:
        reasons = await eventually(all_dead_lettered, timeout=30, what="every hostile message's dead letter")
    except AssertionError:
        reasons = await reasons_now()
    assert all(reasons.values()), f"every hostile message is dead-lettered by the router: {reasons}"
    assert "does not verify" in reasons["forged"] and "unsigned" in reasons["unsigned"]
    hostile_ids = [i for _, h in hostile.values() if (i := _ce_id(h))]
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM consent_notice WHERE change_id::text = ANY($1::text[])", hostile_ids
        )
        == 0
    )
    on_dvla = {header(r, "ce_id") for r in await read_topic(services, topics.agency("dvla"))}
    assert not on_dvla & {*hostile_ids, genuine_id, event_id}, "nothing was passed on to the agency"


# --- who holds data under consent, and the consent keys over HTTP --------------------------------


async def test_an_agency_holds_data_under_consent_if_routed_or_replayed_to_it_on_that_basis(
    pool: asyncpg.Pool,
) -> None:
    subject, now = f"n-{uuid.uuid4().hex}", datetime.now(UTC)
    death, move = uuid.uuid4(), uuid.uuid4()
    for event_id, event_type in ((death, "DeathRegistered"), (move, "AddressChanged")):
        await pool.execute(
            "INSERT INTO intake_record (reference, event_id, event_type, subject_id, registration_office,"
            " recorded_by) VALUES ($1, $2, $3, $4, 'leeds', 'test')",
            f"TEST-{uuid.uuid4().hex[:12]}",
            event_id,
            event_type,
            subject,
        )

    def decision(event_id: uuid.UUID, agency: str, outcome: str, basis: str | None) -> audit.Decision:
        return audit.Decision(str(event_id), agency, "DeathRegistered", outcome, basis, now, [], [])

    async with pool.acquire() as conn, conn.transaction():
        await audit.append_many(
            conn,
            [
                decision(death, "dvla", "DELIVERED", "consent"),
                decision(death, "hmrc", "DELIVERED", "statutory: Registration Service Act 1953 s.19AA"),
                decision(death, "hmpo", "WITHHELD_NO_CONSENT", None),
            ],
        )
    # An operator's replay sent the move to a council, on the basis of consent.
    replay_id = await pool.fetchval(
        "INSERT INTO replay (id, agency, selection, reason, requested_by, dry_run, rate_limit, upto,"
        " selected, status, finished_at)"
        " VALUES ($1, 'council-leeds', $2::jsonb, 'test replay', 'tests', false, 10, 0, 1, 'finished', now())"
        " RETURNING id",
        uuid.uuid4(),
        # A selection `tuo replay list` can read back, as a real replay records it.
        json.dumps(
            {
                "since": None,
                "until": None,
                "subject_id": None,
                "event_ids": [],
                "references": [],
                "event_types": [],
                "everything": True,
            }
        ),
    )
    await pool.execute(
        "INSERT INTO replay_delivery (replay_id, event_id, agency, legal_basis, fields_delivered, sent_at)"
        " VALUES ($1, $2, 'council-leeds', 'consent', '{}', now())",
        replay_id,
        move,
    )
    asked = [
        (subject, agency, event_type)
        for agency in ("dvla", "hmrc", "hmpo", "council-leeds")
        for event_type in ("DeathRegistered", "AddressChanged")
    ] + [(f"n-{uuid.uuid4().hex}", "dvla", "DeathRegistered")]
    async with pool.acquire() as conn:
        assert await holders(conn, asked) == {
            (subject, "dvla", "DeathRegistered"),
            (subject, "council-leeds", "AddressChanged"),
        }


async def test_an_agency_away_from_the_bus_reads_the_consent_keys_from_the_published_key_set(
    services: Settings, pool: asyncpg.Pool
) -> None:
    signer = await consent_signer(pool, services)
    app = FastAPI()
    app.include_router(consent_receipt_keys_router(lambda: pool))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        ring = KeyRing(HttpConsentKeySource("http://citizens.test", client))
        found = await ring.resolve({signer.key_id})
    key = found[signer.key_id]
    assert key.office == CONSENT_SERVICE and key.retired_at is None
    change_id, value, headers = signed_change(services, signer, "dvla")
    verify_consent_change(
        read_signature(headers), key, event_id=change_id, source="/consent", body=decode(value)[1]
    )

    broken = FastAPI()

    @broken.get("/consent-receipts/keys")
    async def not_a_key_set() -> dict[str, object]:
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k", "x": "not base64url!"}]}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=broken)) as client:
        with pytest.raises(KeyRegistryUnavailable, match="consent-receipts/keys"):
            await HttpConsentKeySource("http://citizens.test", client).fetch()


async def test_a_delivery_stored_after_the_withdrawal_was_answered_still_reaches_the_agency(
    services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    """The router answered "not held" before the tracker had stored a delivery that was
    decided before the withdrawal: the tracker asks again, and the agency is told."""
    topics = Topics(services.topic_prefix)
    subject, event_id = f"n-{uuid.uuid4().hex}", uuid.uuid4()
    await pool.execute(
        "INSERT INTO intake_record (reference, event_id, event_type, subject_id, registration_office,"
        " recorded_by) VALUES ($1, $2, 'DeathRegistered', $3, 'leeds', 'test')",
        f"TEST-{uuid.uuid4().hex[:12]}",
        event_id,
        subject,
    )
    decided_at = datetime.now(UTC)
    recorded = await record_consent_change(
        pool,
        services,
        subject_id=subject,
        agency="dvla",
        event_type="DeathRegistered",
        choice="withdrawn",
        recorded_by="citizen",
        signer=await consent_signer(pool, services),
    )
    assert recorded.change_id is not None
    change_id = recorded.change_id

    async def answered() -> bool:
        return await notice(pool, change_id, "dvla") is not None

    await eventually(answered, timeout=60, what="the router's first answer")
    assert await notice(pool, change_id, "dvla") is False

    # The router's decision to deliver, made before the withdrawal, reaches the tracker now.
    value = encode(
        "RoutingDecision",
        models.RoutingDecision(
            event_id=event_id,
            event_type="DeathRegistered",
            agency="dvla",
            outcome="DELIVERED",
            legal_basis="consent",
            decided_at=decided_at,
            fields_delivered=["deceased"],
            fields_withheld=[],
        ).avro(),
    )
    headers = headers_for(
        value,
        id=f"{event_id}/dvla",
        source="/router",
        subject=subject,
        time=decided_at,
        schema_base_url=services.schema_base_url(),
    )
    producer = inspector_producer(services)
    await producer.start()
    try:
        await producer.send_and_wait(topics.routing_decisions, value, key=subject.encode(), headers=headers)
    finally:
        await producer.stop()

    async def told() -> bool:
        return await notice(pool, change_id, "dvla") is True

    await eventually(told, timeout=60, what="the router's second answer")

    async def applied() -> bool:
        return await applied_by(pool, change_id, "dvla")

    await eventually(applied, timeout=60, what="DVLA's receipt for the withdrawal")
    assert len(with_id(await read_topic(services, topics.agency("dvla")), str(change_id))) == 1


def address_change(nino: str, consents: list[dict[str, str]]) -> dict[str, object]:
    return {
        "informant": {"name": "A registrar's caller", "relationship": "self"},
        "channel": "desk",
        "person": {"given_names": "Sam", "family_name": "Mover", "nino": nino},
        "old_address": {"lines": ["3 Old Lane"], "town": "York", "postcode": "YO1 7HH"},
        "new_address": {
            "lines": [f"{uuid.uuid4().int % 900 + 100} Sample Road"],
            "town": "Leeds",
            "postcode": "LS2 7AB",
        },
        "effective_date": today().isoformat(),
        "consents": consents,
    }


async def test_an_informants_refusal_at_the_desk_that_ends_a_consent_reaches_the_agency(
    services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    nino = random_nino()
    subject = subject_id_for(nino, services.require_pseudonym_key())
    first = await intake.post(
        "/v1/address-changes",
        json=address_change(
            nino, [{"agency": "dvla", "choice": "given"}, {"agency": "hmrc", "choice": "refused"}]
        ),
    )
    assert first.status_code == 201, first.text
    first_id = await pool.fetchval(
        "SELECT event_id FROM intake_record WHERE reference = $1", first.json()["reference"]
    )

    async def dvla_has_it() -> bool:
        return bool(
            await pool.fetchval(
                "SELECT 1 FROM routing_decision WHERE event_id = $1 AND agency = 'dvla'"
                " AND outcome = 'DELIVERED' AND legal_basis = 'consent'",
                first_id,
            )
        )

    await eventually(dvla_has_it, timeout=60, what="the first move delivered to DVLA under consent")
    # The next move: the informant now refuses DVLA, and refuses HMRC again.
    second = await intake.post(
        "/v1/address-changes",
        json=address_change(
            nino, [{"agency": "dvla", "choice": "refused"}, {"agency": "hmrc", "choice": "refused"}]
        ),
    )
    assert second.status_code == 201, second.text
    rows = await pool.fetch(
        "SELECT agency, choice, recorded_by, change_id FROM consent_record"
        " WHERE subject_id = $1 AND event_type = 'AddressChanged' ORDER BY id",
        subject,
    )
    assert [(r["agency"], r["choice"], r["change_id"] is not None) for r in rows] == [
        ("dvla", "given", False),
        ("hmrc", "refused", False),
        ("dvla", "refused", True),  # in the order given
        ("hmrc", "refused", False),  # refused before as well: nothing ends, nothing to tell
    ]
    change_id = rows[2]["change_id"]

    async def applied() -> bool:
        return await applied_by(pool, change_id, "dvla")

    await eventually(applied, timeout=60, what="DVLA's receipt for the informant's refusal")
    assert await notice(pool, change_id, "dvla") is True
    stopped = await pool.fetchrow(
        "SELECT choice, recorded_by FROM agency.consent_withdrawal WHERE agency = 'dvla' AND change_id = $1",
        change_id,
    )
    assert stopped is not None and dict(stopped) == {"choice": "REFUSED", "recorded_by": "INFORMANT"}


async def test_a_proxys_withdrawal_reaches_the_agency_and_the_person_sees_it(
    stack: Stack, services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    amara = subject_id_for(AMARA.nino, services.require_pseudonym_key())
    moved = await intake.post(
        "/v1/address-changes", json=address_change(AMARA.nino, [{"agency": "dvla", "choice": "given"}])
    )
    assert moved.status_code == 201, moved.text
    event_id = await pool.fetchval(
        "SELECT event_id FROM intake_record WHERE reference = $1", moved.json()["reference"]
    )

    async def dvla_has_it() -> bool:
        return bool(
            await pool.fetchval(
                "SELECT 1 FROM routing_decision WHERE event_id = $1 AND agency = 'dvla'"
                " AND outcome = 'DELIVERED' AND legal_basis = 'consent'",
                event_id,
            )
        )

    await eventually(dvla_has_it, timeout=60, what="the move delivered to DVLA under consent")
    appointment = await appoint_proxy_by_nino(
        pool,
        stack.settings,
        proxy_nino=CHRIS.nino,
        subject_nino=AMARA.nino,
        subject_name="Amara Okafor",
        agencies=["dvla"],
        recorded_by="test operator",
        reason="Lasting power of attorney, registered 2026",
    )
    async with browser() as client:
        assert (await sign_in(client, stack, CHRIS.sub)).status_code == 303
        csrf = (await whoami(client, stack)).json()["csrf"]
        form = {
            "csrf_token": csrf,
            "subject_id": amara,
            "agency": "dvla",
            "event_type": "AddressChanged",
            "choice": "no",
            "for": str(appointment),
        }
        withdrawn = await client.post(f"{stack.base_url}/citizen/consents", data=form)
        assert withdrawn.status_code == 200, withdrawn.text
    change_id = await latest_change_id(pool, amara, "dvla", "AddressChanged")
    assert change_id is not None

    async def applied() -> bool:
        return await applied_by(pool, change_id, "dvla")

    await eventually(applied, timeout=60, what="DVLA's receipt for the proxy's withdrawal")
    assert (
        await pool.fetchval(
            "SELECT recorded_by FROM agency.consent_withdrawal WHERE agency = 'dvla' AND change_id = $1",
            change_id,
        )
        == "PROXY"
    )
    async with browser() as client:
        assert (await sign_in(client, stack, AMARA.sub)).status_code == 303
        history = (await client.get(f"{stack.base_url}/citizen/download")).json()["consent_history"]
    by_proxy = next(c for c in history if c["agency"] == "dvla" and c["event_type"] == "AddressChanged")
    assert (by_proxy["recorded_by"], by_proxy["agency_notice"], by_proxy["agency_receipt"]) == (
        "proxy",
        "told",
        "applied",
    )
