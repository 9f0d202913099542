"""Per-person interest (the Dutch BRP's afnemersindicatie): an agency whose subscription is
scoped to registered subjects hears only of the people it registered, by NINO over HTTPS
or from a file on the command line, and no more of someone once it withdraws them."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from citizens.data_tracker import consent_settings
from consumers.agency_api import create_client
from router.interest import NotANino, change_interest, subject_ids
from router.rules import Condition, Outcome, RoutableEvent, Subscription, decide
from router.subscription_versions import current_terms, write_terms
from runtime.access import onboard_agency
from runtime.pseudonyms import subject_id_for
from runtime.settings import Settings
from tests.support import death_registration, eventually, random_nino, tuo_cli

KEY = b"test-pseudonym-key"
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def _scoped(agency: str) -> Subscription:
    return Subscription(
        agency,
        "DeathRegistered",
        "statutory",
        "Pensions Act",
        None,
        None,
        "active",
        condition=Condition(registered_subjects=True),
    )


def test_a_scoped_subscription_delivers_only_to_an_agency_that_registered_the_subject() -> None:
    event = RoutableEvent("e1", "DeathRegistered", "n-1", fields=frozenset({"deceased", "date_of_death"}))
    everyone = Subscription("hmrc", "DeathRegistered", "statutory", "ITEPA", None, None, "active")
    [dwp, hmrc] = decide(event, [_scoped("dwp"), everyone], {}, NOW, interested=frozenset())
    assert (dwp.agency, dwp.outcome, dwp.legal_basis) == ("dwp", Outcome.WITHHELD_NOT_OF_INTEREST, None)
    assert dwp.fields_delivered == frozenset() and dwp.fields_withheld == event.fields
    assert hmrc.outcome is Outcome.DELIVERED  # an unscoped subscription is not affected
    [dwp] = decide(event, [_scoped("dwp")], {}, NOW, interested=frozenset({"dwp"}))
    assert dwp.outcome is Outcome.DELIVERED and dwp.fields_delivered == event.fields
    [dwp] = decide(event, [_scoped("dwp")], {}, NOW, interested=frozenset({"other"}))
    assert dwp.outcome is Outcome.WITHHELD_NOT_OF_INTEREST


def test_the_scope_is_kept_in_the_subscriptions_condition() -> None:
    condition = Condition(local_authorities=frozenset({"E08000035"}), registered_subjects=True)
    assert condition.to_json() == {"local_authorities": ["E08000035"], "registered_subjects": True}
    assert Condition.from_json(condition.to_json()) == condition
    assert (
        Condition.from_json({"registered_subjects": "yes"}).registered_subjects is False
    )  # only true is true
    assert condition.describe() == "local authority E08000035; registered subjects only"


def test_ninos_become_the_subject_ids_intake_gives_and_a_bad_one_changes_nothing() -> None:
    assert subject_ids(["ab 12 34 56 c", "AB123456C"], KEY) == [subject_id_for("AB123456C", KEY)]
    with pytest.raises(NotANino) as refused:
        subject_ids(["AB123456C", "not a nino", "QQ123456C", "AB123456C"], KEY)
    assert refused.value.positions == [2, 3]
    assert "not a nino" not in str(refused.value) and "item(s) 2, 3" in str(refused.value)


# --- on the session's bus -------------------------------------------------------------------


def _move(nino: str) -> dict[str, Any]:
    return {
        "informant": {"name": "A caller at the desk", "relationship": "self"},
        "channel": "desk",
        "person": {"given_names": "Interest", "family_name": "Tested", "nino": nino},
        "old_address": {"lines": ["3 Old Lane"], "town": "York", "postcode": "YO1 7HH"},
        "new_address": {
            "lines": [f"{uuid.uuid4().int % 900 + 100} Sample Road"],
            "town": "Leeds",
            "postcode": "LS2 7AB",
        },
        "effective_date": (datetime.now(UTC).date() - timedelta(days=1)).isoformat(),
        "consents": [],
    }


async def _bearer(pool: asyncpg.Pool, intake: httpx.AsyncClient, agency: str) -> dict[str, str]:
    """The Authorization header of a new OAuth2 client of ``agency``, with every scope."""
    made = await create_client(pool, agency, by="tests")
    answer = await intake.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, auth=(made.client_id, made.client_secret)
    )
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


async def _death_of(intake: httpx.AsyncClient, nino: str) -> dict[str, Any]:
    """Register the death of the person with ``nino``; intake's answer."""
    deceased = {"given_names": "Interest", "family_name": "Tested", "date_of_birth": "1941-03-02"}
    body = death_registration(deceased={**deceased, "nino": nino})
    response = await intake.post("/v1/death-registrations", json=body)
    assert response.status_code == 201, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def _outcome(pool: asyncpg.Pool, event_id: str, agency: str) -> str:
    async def decided() -> str | None:
        outcome: str | None = await pool.fetchval(
            "SELECT outcome FROM routing_decision WHERE event_id = $1 AND agency = $2",
            uuid.UUID(event_id),
            agency,
        )
        return outcome

    return await eventually(decided, timeout=60, what=f"the decision on {event_id} for {agency}")


@pytest.mark.integration
async def test_an_agency_hears_only_of_the_people_it_registered_until_it_withdraws_them(
    services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient, tmp_path: Path
) -> None:
    agency = f"int-{uuid.uuid4().hex[:8]}"
    await onboard_agency(services, pool, agency, ["DeathRegistered", "AddressChanged"], by="tests")
    try:
        for event_type, fields in (
            ("DeathRegistered", ["deceased", "date_of_death"]),
            ("AddressChanged", ["person"]),
        ):
            code, out = await asyncio.to_thread(
                tuo_cli,
                services,
                "subscriptions",
                "add",
                agency,
                event_type,
                "--basis",
                "statutory",
                "--statute",
                "Test Act 2026 s.3",
                *[a for f in fields for a in ("--field", f)],
                "--registered-only",
            )
            assert code == 0, out
        registered, other = random_nino(), random_nino()
        bearer = await _bearer(pool, intake, agency)
        bad = await intake.post(
            "/v1/agency/interest", json={"register": [registered, "nonsense"]}, headers=bearer
        )
        assert bad.status_code == 422 and "item(s) 2" in bad.text and "nonsense" not in bad.text
        answer = await intake.post("/v1/agency/interest", json={"register": [registered]}, headers=bearer)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "agency": agency,
            "registered": 1,
            "withdrawn": 0,
            "unchanged": 0,
            "registered_now": 1,
        }
        # The NINO is not kept: only the subject id intake gives that person.
        assert await pool.fetchval(
            "SELECT subject_id FROM agency_interest WHERE agency = $1", agency
        ) == subject_id_for(registered, services.require_pseudonym_key())

        deaths = {nino: await _death_of(intake, nino) for nino in (registered, other)}
        assert await _outcome(pool, deaths[registered]["event_id"], agency) == "DELIVERED"
        assert await _outcome(pool, deaths[other]["event_id"], agency) == "WITHHELD_NOT_OF_INTEREST"
        code, out = await asyncio.to_thread(
            tuo_cli, services, "status", deaths[other]["reference"], "--reason", "checking a test event"
        )
        assert code == 0 and "withheld: not of interest" in next(
            line for line in out.splitlines() if agency in line
        ), out

        # Withdrawn from a file on the command line: the next event about them is withheld.
        listing = tmp_path / "withdraw.txt"
        listing.write_text(f"# people {agency} no longer holds\n{registered[:2]} {registered[2:]}\n\n")
        code, out = await asyncio.to_thread(
            tuo_cli,
            services,
            "agencies",
            "interest",
            agency,
            "--file",
            str(listing),
            "--withdraw",
            env={"TUO_PSEUDONYM_KEY": services.require_pseudonym_key().decode()},  # the bus's
        )
        assert code == 0 and "1 withdrawn" in out and "0 registered now" in out, out
        moved = await intake.post("/v1/address-changes", json=_move(registered))
        assert moved.status_code == 201, moved.text
        assert await _outcome(pool, moved.json()["event_id"], agency) == "WITHHELD_NOT_OF_INTEREST"
    finally:
        await pool.execute("UPDATE subscription SET status = 'suspended' WHERE agency = $1", agency)


@pytest.mark.integration
def test_interest_from_the_command_line_refuses_bad_files_clearly(
    services: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    code, out = tuo_cli(services, "agencies", "interest", "hmrc", "--file", str(empty))
    assert code == 1 and "holds no NINOs" in out, out
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("AB123456C\nZZ999999Z\n")
    code, out = tuo_cli(services, "agencies", "interest", "hmrc", "--file", str(wrong))
    assert code == 1 and "item(s) 2; nothing was changed" in out and "ZZ999999Z" not in out, out
    missing = tmp_path / "none.txt"
    code, out = tuo_cli(services, "agencies", "interest", "hmrc", "--file", str(missing))
    assert code != 0 and "does not exist" in out.replace("\n", " "), out
    right = tmp_path / "right.txt"
    right.write_text("AB123456C\n")
    code, out = tuo_cli(services, "agencies", "interest", "no-such-agency", "--file", str(right))
    assert code == 1 and "no agency 'no-such-agency'" in out, out


@pytest.mark.integration
async def test_a_citizen_is_offered_a_registered_only_choice_only_if_the_agency_registered_them(
    services: Settings, pool: asyncpg.Pool
) -> None:
    agency = f"int-{uuid.uuid4().hex[:8]}"
    await onboard_agency(services, pool, agency, ["AddressChanged"], by="tests")
    code, out = await asyncio.to_thread(
        tuo_cli,
        services,
        "subscriptions",
        "add",
        agency,
        "AddressChanged",
        "--basis",
        "consent",
        "--field",
        "new_address",
        "--registered-only",
    )
    assert code == 0, out
    theirs, someone_else = random_nino(), random_nino()
    key = services.require_pseudonym_key()
    try:
        await change_interest(pool, agency, register=subject_ids([theirs], key), withdraw=[], by="tests")
        offered = {s.agency for s in await consent_settings(pool, subject_id_for(theirs, key), None)}
        not_offered = {
            s.agency for s in await consent_settings(pool, subject_id_for(someone_else, key), None)
        }
        assert agency in offered and agency not in not_offered
        assert "hmrc" in offered and "hmrc" in not_offered  # an unscoped choice is everyone's
    finally:
        await pool.execute("UPDATE subscription SET status = 'suspended' WHERE agency = $1", agency)


@pytest.mark.integration
async def test_dwp_narrowed_to_the_people_it_registered_hears_only_of_their_deaths(
    services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    """The seeded DWP, not a test agency: it narrows its own death subscription to the people
    it registered (a narrowing, so in force at once), hears of their deaths and no one
    else's, and no more of someone it withdrew. Widening back waits for an operator."""
    async with pool.acquire() as conn:
        seeded = await current_terms(conn, "dwp", "DeathRegistered")
    assert seeded is not None and seeded.fields and not seeded.condition.registered_subjects
    bearer = await _bearer(pool, intake, "dwp")
    terms = {
        "event_type": "DeathRegistered",
        "basis": seeded.legal_basis,
        "statute": seeded.statute,
        "fields": sorted(seeded.fields),
    }
    try:
        narrowed = await intake.post(
            "/v1/agency/subscriptions/changes",
            json={**terms, "registered_subjects": True, "reason": "we hold claims for few of the deceased"},
            headers=bearer,
        )
        assert narrowed.status_code == 201, narrowed.text
        version = narrowed.json()["version"]
        claimant, withdrawn, stranger = random_nino(), random_nino(), random_nino()
        answer = await intake.post(
            "/v1/agency/interest", json={"register": [claimant, withdrawn]}, headers=bearer
        )
        assert answer.status_code == 200 and answer.json()["registered"] == 2, answer.text
        answer = await intake.post("/v1/agency/interest", json={"withdraw": [withdrawn]}, headers=bearer)
        assert answer.status_code == 200 and answer.json()["withdrawn"] == 1, answer.text

        deaths = {n: (await _death_of(intake, n))["event_id"] for n in (claimant, withdrawn, stranger)}
        assert await _outcome(pool, deaths[claimant], "dwp") == "DELIVERED"
        assert await _outcome(pool, deaths[withdrawn], "dwp") == "WITHHELD_NOT_OF_INTEREST"
        assert await _outcome(pool, deaths[stranger], "dwp") == "WITHHELD_NOT_OF_INTEREST"
        assert await _outcome(pool, deaths[stranger], "hmrc") == "DELIVERED"  # others unchanged
        assert (
            await pool.fetchval(
                "SELECT subscription_version FROM routing_decision WHERE event_id = $1 AND agency = 'dwp'",
                uuid.UUID(deaths[claimant]),
            )
            == version
        )

        # DWP's own consumer took the claimant's death into its inbox and receipted it; the
        # others never reached it.
        async def receipted() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT count(*) FROM delivery_receipt WHERE event_id = $1 AND agency = 'dwp'"
                    " AND outcome IN ('APPLIED', 'REJECTED')",
                    uuid.UUID(deaths[claimant]),
                )
            )

        await eventually(receipted, timeout=60, what="DWP's receipt for the claimant's death")
        in_inbox = await pool.fetch(
            "SELECT event_id::text FROM agency.inbox WHERE agency = 'dwp' AND event_id = ANY($1::uuid[])",
            list(deaths.values()),
        )
        assert [r["event_id"] for r in in_inbox] == [deaths[claimant]]

        widened = await intake.post(
            "/v1/agency/subscriptions/changes",
            json={**terms, "reason": "back to every death, as before"},
            headers=bearer,
        )
        assert widened.status_code == 202, widened.text
        assert widened.json()["state"] == "pending", widened.text
        code, out = await asyncio.to_thread(
            tuo_cli,
            services,
            "subscriptions",
            "approve",
            str(widened.json()["id"]),
            "--reason",
            "restoring the seeded terms after the test",
            "--by",
            "tests",
        )
        assert code == 0, out
    finally:
        async with pool.acquire() as conn, conn.transaction():
            await write_terms(
                conn, "dwp", "DeathRegistered", seeded, changed_by="tests", reason="the seeded terms again"
            )
