"""Subscriptions with a history: every version kept however it was written, agencies'
own requests (a narrowing at once, anything wider only once an operator approves it), and
routing decisions that name the version they were made on."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from consumers.agency_api import create_client
from router import audit
from router.rules import Condition, Outcome, RoutableEvent, Subscription, decide
from router.store import event_status, upsert_subscription
from router.subscription_versions import (
    ChangeRefused,
    Terms,
    approve,
    changes,
    history,
    reject,
    request_change,
    widenings,
)
from runtime.access import onboard_agency
from runtime.settings import Settings
from tests.support import death_registration, eventually, random_nino, tuo_cli

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
BASE = Terms("statutory", "Test Act 2026 s.1", frozenset({"deceased", "date_of_death"}))


def _with(**changes: Any) -> Terms:
    return dataclasses.replace(BASE, **changes)


@pytest.mark.parametrize(
    ("proposed", "needs"),
    [
        (_with(fields=frozenset({"date_of_death"})), []),
        (_with(status="suspended"), []),
        (_with(condition=Condition(registered_subjects=True)), []),
        (_with(condition=Condition(local_authorities=frozenset({"E08000035"}))), []),
        (_with(valid_to=NOW), []),
        (
            _with(fields=frozenset({"date_of_death", "deceased", "last_address"})),
            ["more fields: last_address"],
        ),
        (_with(fields=None), ["every field"]),
        (_with(legal_basis="consent", statute=None), ["legal basis statutory → consent"]),
        (_with(statute="Another Act 2027"), ["a different statute"]),
        (
            _with(fields=frozenset({"date_of_death", "place_of_death"}), statute="Another Act 2027"),
            ["a different statute", "more fields: place_of_death"],
        ),
    ],
    ids=[
        "fewer-fields",
        "suspended",
        "registered-only",
        "one-authority",
        "ends",
        "more-fields",
        "all-fields",
        "basis",
        "statute",
        "statute-and-fields",
    ],
)
def test_a_change_needs_approval_exactly_when_it_gives_the_agency_more(
    proposed: Terms, needs: list[str]
) -> None:
    assert widenings(BASE, proposed) == needs


def test_undoing_a_narrowing_is_a_widening() -> None:
    narrowed = _with(
        condition=Condition(local_authorities=frozenset({"E08000035"}), registered_subjects=True),
        valid_from=NOW,
        valid_to=NOW + timedelta(days=30),
        status="suspended",
    )
    assert widenings(narrowed, BASE) == [
        "everyone, not only registered subjects",
        "every local authority",
        "starts earlier",
        "ends later",
        "resumes",
    ]
    more_councils = _with(condition=Condition(local_authorities=frozenset({"E08000035", "E08000032"})))
    assert widenings(narrowed, more_councils)[1] == "more local authorities: E08000032"
    assert widenings(None, BASE) == ["a new event type"]


def test_a_decision_names_the_version_it_was_made_on() -> None:
    event = RoutableEvent("e1", "DeathRegistered", "n-1", fields=frozenset({"deceased", "date_of_death"}))
    statutory = Subscription("hmrc", "DeathRegistered", "statutory", "ITEPA", None, None, "active", version=7)
    consent = Subscription("dvla", "DeathRegistered", "consent", None, None, None, "active", version=9)
    other = Subscription("dwp", "BirthRegistered", "statutory", "SSAA", None, None, "active", version=3)
    decided = {d.agency: d for d in decide(event, [statutory, consent, other], {}, NOW)}
    assert (decided["hmrc"].outcome, decided["hmrc"].subscription_version) == (Outcome.DELIVERED, 7)
    assert (decided["dvla"].outcome, decided["dvla"].subscription_version) == (Outcome.WITHHELD_NO_CONSENT, 9)
    assert (decided["dwp"].outcome, decided["dwp"].subscription_version) == (
        Outcome.WITHHELD_NO_SUBSCRIPTION,
        None,
    )


def test_the_version_is_in_the_decisions_hash_and_a_decision_without_one_hashes_as_before() -> None:
    before = audit.Decision("e1", "hmrc", "DeathRegistered", "DELIVERED", "consent", NOW, ["deceased"], [])
    versioned = dataclasses.replace(before, subscription_version=4)
    other = dataclasses.replace(before, subscription_version=5)
    assert len({audit.row_hash(1, d, audit.GENESIS) for d in (before, versioned, other)}) == 3
    # The chain's rows from before versions keep their hashes: the content is unchanged.
    assert (
        audit.row_hash(1, before, audit.GENESIS)
        == hashlib.sha256(
            "\x1f".join(
                [
                    "1",
                    "e1",
                    "hmrc",
                    "DeathRegistered",
                    "DELIVERED",
                    "consent",
                    NOW.isoformat(),
                    "deceased",
                    "",
                    "0" * 64,
                ]
            ).encode()
        ).hexdigest()
    )


# --- in PostgreSQL --------------------------------------------------------------------------


async def _set(pool: asyncpg.Pool, agency: str, fields: list[str], by: str, reason: str = "") -> int:
    """An operator's statutory subscription to deaths under the Test Act 2026 s.1."""
    return await upsert_subscription(
        pool,
        agency=agency,
        event_type="DeathRegistered",
        legal_basis="statutory",
        statute="Test Act 2026 s.1",
        fields=fields,
        condition=None,
        by=by,
        reason=reason,
    )


async def _token(
    pool: asyncpg.Pool, intake: httpx.AsyncClient, agency: str, scopes: tuple[str, ...] | None = None
) -> str:
    made = await create_client(pool, agency, by="tests", **({} if scopes is None else {"scopes": scopes}))
    answer = await intake.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, auth=(made.client_id, made.client_secret)
    )
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["access_token"]
    return token


@pytest.fixture
async def agency(services: Settings, pool: asyncpg.Pool) -> AsyncIterator[str]:
    name = f"ver-{uuid.uuid4().hex[:8]}"
    await onboard_agency(services, pool, name, ["DeathRegistered"], by="tests")
    yield name
    await pool.execute("UPDATE subscription SET status = 'suspended' WHERE agency = $1", name)


async def test_every_writer_leaves_a_version_with_who_and_why(pool: asyncpg.Pool, agency: str) -> None:
    [skeleton] = await history(pool, agency)
    assert (skeleton.changed_by, skeleton.reason) == (
        "tests",
        "onboarded: a suspended subscription to fill in",
    )
    first = await _set(pool, agency, ["date_of_death"], "alice", "the agreement signed on 1 December")
    # The same terms again are the same version.
    again = await _set(pool, agency, ["date_of_death"], "bob")
    assert again == first
    # Plain SQL cannot change terms without leaving the old ones behind.
    await pool.execute("UPDATE subscription SET fields = '{deceased}' WHERE agency = $1", agency)
    found = await history(pool, agency)
    assert [v.id for v in found] == [skeleton.id, first, found[2].id] and found[2].id > first
    assert found[1].changed_by == "alice" and found[1].reason == "the agreement signed on 1 December"
    assert found[2].terms.fields == frozenset({"deceased"}) and found[2].reason == "not given"
    assert found[0].in_force_to == found[1].in_force_from and found[1].in_force_to == found[2].in_force_from
    assert found[2].in_force_to is None
    assert await pool.fetchval("SELECT version FROM subscription WHERE agency = $1", agency) == found[2].id
    await pool.execute("DELETE FROM subscription WHERE agency = $1", agency)
    assert (await history(pool, agency))[-1].in_force_to is not None  # ended, and still listed


async def test_a_narrowing_applies_at_once_and_a_widening_waits_for_an_operator(
    pool: asyncpg.Pool, agency: str
) -> None:
    start = await _set(pool, agency, ["date_of_death", "deceased"], "alice", "agreed")
    narrower = _with(fields=frozenset({"date_of_death"}))
    done = await request_change(
        pool, agency, "DeathRegistered", narrower, requested_by=f"api:{agency}", reason="we need less"
    )
    assert (done.state, done.widens) == ("applied", []) and done.version is not None and done.version > start
    with pytest.raises(ChangeRefused, match="already"):
        await request_change(pool, agency, "DeathRegistered", narrower, requested_by="x", reason="same again")

    wider = _with(statute="Test Act 2026 s.1", fields=frozenset({"date_of_death", "place_of_death"}))
    waiting = await request_change(
        pool,
        agency,
        "DeathRegistered",
        wider,
        requested_by=f"api:{agency}",
        reason="to find the register office",
    )
    assert (waiting.state, waiting.widens, waiting.version) == (
        "pending",
        ["more fields: place_of_death"],
        None,
    )
    assert await pool.fetchval("SELECT version FROM subscription WHERE agency = $1", agency) == done.version
    with pytest.raises(ChangeRefused, match="waiting for approval"):
        await request_change(pool, agency, "DeathRegistered", BASE, requested_by="x", reason="another one")
    assert [c.id for c in await changes(pool, agency=agency)] == [waiting.id]

    with pytest.raises(ChangeRefused, match="reason of 3 to 500"):
        await approve(pool, waiting.id, by="carol", reason="")
    approved = await approve(pool, waiting.id, by="carol", reason="covered by the agreement's schedule 2")
    assert approved.state == "applied" and approved.decided_by == "carol" and approved.version is not None
    latest = (await history(pool, agency))[-1]
    assert (latest.id, latest.changed_by, latest.approved_by, latest.change_id) == (
        approved.version,
        f"api:{agency}",
        "carol",
        waiting.id,
    )
    assert latest.terms == wider and latest.in_force_to is None
    with pytest.raises(ChangeRefused, match="applied already by carol"):
        await reject(pool, waiting.id, by="dave", reason="too late")

    resumed = await request_change(
        pool, agency, "DeathRegistered", _with(fields=None), requested_by=f"api:{agency}", reason="everything"
    )
    refused = await reject(pool, resumed.id, by="dave", reason="no need shown for every field")
    assert (refused.state, refused.decision_reason, refused.version) == (
        "rejected",
        "no need shown for every field",
        None,
    )
    assert (await history(pool, agency))[-1].id == approved.version  # unchanged
    with pytest.raises(ChangeRefused, match="no subscription change 0"):
        await approve(pool, 0, by="carol", reason="nothing")


# --- on the session's bus -------------------------------------------------------------------


async def _decision(pool: asyncpg.Pool, event_id: str, agency: str) -> asyncpg.Record:
    async def decided() -> asyncpg.Record | None:
        row: asyncpg.Record | None = await pool.fetchrow(
            "SELECT * FROM routing_decision WHERE event_id = $1 AND agency = $2", uuid.UUID(event_id), agency
        )
        return row

    return await eventually(decided, timeout=60, what=f"the decision on {event_id} for {agency}")


@pytest.mark.integration
async def test_an_agencys_wider_request_applies_only_once_approved_and_each_decision_names_its_version(
    services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient, agency: str
) -> None:
    v1 = await _set(pool, agency, ["date_of_death"], "tests", "the first agreement")
    token = await _token(pool, intake, agency)
    bearer = {"Authorization": f"Bearer {token}"}

    async def death() -> str:
        body = death_registration(
            deceased={
                "given_names": "Version",
                "family_name": "Tested",
                "date_of_birth": "1941-03-02",
                "nino": random_nino(),
            }
        )
        response = await intake.post("/v1/death-registrations", json=body)
        assert response.status_code == 201, response.text
        event_id: str = response.json()["event_id"]
        return event_id

    # Each decision is awaited before the next step: the version is the one in force when
    # the router decides, which may be a moment after intake accepted the event.
    before = await death()
    first = await _decision(pool, before, agency)
    asked = {
        "event_type": "DeathRegistered",
        "basis": "statutory",
        "statute": "Test Act 2027 s.4",
        "fields": ["date_of_death", "deceased"],
        "reason": "the new Act lets us close the person's accounts",
    }
    answer = await intake.post("/v1/agency/subscriptions/changes", json=asked, headers=bearer)
    assert answer.status_code == 202, answer.text
    pending = answer.json()
    assert pending["state"] == "pending" and pending["needs_approval_for"] == [
        "a different statute",
        "more fields: deceased",
    ]
    waiting = await death()  # decided while the request waits: on the terms in force
    second = await _decision(pool, waiting, agency)
    code, out = await asyncio.to_thread(tuo_cli, services, "subscriptions", "changes")
    assert code == 0 and agency in out and "more fields: deceased" in out, out
    code, out = await asyncio.to_thread(
        tuo_cli,
        services,
        "subscriptions",
        "approve",
        str(pending["id"]),
        "--reason",
        "checked against the Act",
        "--by",
        "carol",
    )
    assert code == 0 and "from now" in out, out
    after = await death()

    third = await _decision(pool, after, agency)
    v2 = await pool.fetchval("SELECT version FROM subscription WHERE agency = $1", agency)
    assert v2 > v1
    for row, version, basis, fields in (
        (first, v1, "statutory: Test Act 2026 s.1", ["date_of_death"]),
        (second, v1, "statutory: Test Act 2026 s.1", ["date_of_death"]),
        (third, v2, "statutory: Test Act 2027 s.4", ["date_of_death", "deceased"]),
    ):
        assert (row["outcome"], row["subscription_version"], row["legal_basis"]) == (
            "DELIVERED",
            version,
            basis,
        )
        assert sorted(row["fields_delivered"]) == fields
        # The version is in the chain's hash: the tracker stored what the router's Avro decision said.
        assert row["hash"] == audit.row_hash(row["seq"], audit.Decision.of(row), row["prev_hash"])
    # What the citizen's page shows: the basis each event was decided on, not today's.
    shown = await event_status(
        pool,
        (await pool.fetchval("SELECT reference FROM intake_record WHERE event_id = $1", uuid.UUID(before))),
    )
    assert shown is not None
    [mine] = [a for a in shown["agencies"] if a["agency"] == agency]
    assert mine["legal_basis"] == "statutory: Test Act 2026 s.1" and mine["subscription_version"] == v1

    listed = await intake.get("/v1/agency/subscriptions", headers=bearer)
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert [v["version"] for v in body["in_force"]] == [v2]
    assert [v["version"] for v in body["versions"]][-2:] == [v1, v2]
    assert body["versions"][-1]["approved_by"] == "carol" and body["versions"][-2]["in_force_to"] is not None
    assert (
        body["changes"][0]["state"] == "applied"
        and body["changes"][0]["decision_reason"] == "checked against the Act"
    )
    code, out = await asyncio.to_thread(tuo_cli, services, "subscriptions", "history", agency)
    assert code == 0 and "approved by carol" in out and "Test Act 2027 s.4" in out, out


@pytest.mark.integration
@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (
            {
                "event_type": "DeathRegistered",
                "basis": "statutory",
                "fields": ["deceased"],
                "reason": "x y z",
            },
            422,
            "statute",
        ),
        (
            {
                "event_type": "DeathRegistered",
                "basis": "consent",
                "fields": ["no_such_field"],
                "reason": "xyz",
            },
            422,
            "no field path",
        ),
        (
            {"event_type": "Wedding", "basis": "consent", "fields": ["deceased"], "reason": "xyz"},
            422,
            "must be one of",
        ),
        (
            {
                "event_type": "DeathRegistered",
                "basis": "consent",
                "fields": ["deceased"],
                "reason": "x" * 501,
            },
            422,
            "500",
        ),
        ({"event_type": "DeathRegistered", "basis": "consent", "fields": ["deceased"]}, 422, "reason"),
        (
            {"event_type": "DeathRegistered", "basis": "consent", "fields": ["deceased"], "reason": "a\nb c"},
            422,
            "plain text",
        ),
        (
            {
                "event_type": "DeathRegistered",
                "basis": "consent",
                "fields": ["deceased"],
                "reason": "xyz",
                "agency": "hmrc",
            },
            422,
            "Extra inputs",
        ),
        (
            {
                "event_type": "DeathRegistered",
                "basis": "consent",
                "fields": ["deceased"],
                "reason": "xyz",
                "valid_from": "2027-01-02T00:00:00Z",
                "valid_to": "2027-01-01T00:00:00Z",
            },
            422,
            "end after it starts",
        ),
        (
            {
                "event_type": "DeathRegistered",
                "basis": "consent",
                "fields": ["deceased"],
                "reason": "xyz",
                "valid_to": "2027-01-01",
            },
            422,
            "timezone",
        ),
    ],
    ids=[
        "no-statute",
        "unknown-path",
        "unknown-type",
        "long-reason",
        "no-reason",
        "control-chars",
        "other-agency",
        "validity",
        "naive-time",
    ],
)
async def test_a_request_the_bus_cannot_grant_is_refused_and_changes_nothing(
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    agency: str,
    body: dict[str, object],
    status: int,
    says: str,
) -> None:
    token = await _token(pool, intake, agency)
    answer = await intake.post(
        "/v1/agency/subscriptions/changes", json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.status_code == status and says in answer.text, answer.text
    assert await changes(pool, agency=agency, pending_only=False) == []
    assert len(await history(pool, agency)) == 1  # the onboarding skeleton only


@pytest.mark.integration
async def test_only_a_token_with_the_subscriptions_scope_sees_or_asks_and_only_for_its_own_agency(
    services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient, agency: str
) -> None:
    token = await _token(pool, intake, agency, ("receipts:write",))
    bearer = {"Authorization": f"Bearer {token}"}
    assert (await intake.get("/v1/agency/subscriptions", headers=bearer)).status_code == 403
    asked = {"event_type": "DeathRegistered", "basis": "consent", "fields": ["deceased"], "reason": "xyz"}
    assert (
        await intake.post("/v1/agency/subscriptions/changes", json=asked, headers=bearer)
    ).status_code == 403
    assert (await intake.get("/v1/agency/subscriptions")).status_code == 401

    other = f"ver-{uuid.uuid4().hex[:8]}"
    await onboard_agency(services, pool, other, ["DeathRegistered"], by="tests")
    token = await _token(pool, intake, other)
    listed = (
        await intake.get("/v1/agency/subscriptions", headers={"Authorization": f"Bearer {token}"})
    ).json()
    assert listed["agency"] == other and agency not in listed.__repr__()
    assert await changes(pool, agency=agency, pending_only=False) == []
