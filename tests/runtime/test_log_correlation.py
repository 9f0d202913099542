"""One event can be followed through the JSON logs of every component by its id.

A death is registered at intake and goes through the relay, the router, each
entitled agency's consumer and the receipt tracker of the session's bus. Every
line written about it, in every component, names it under the one key
``event_id``; at DEBUG each component has at least one such line, tagged with
the component that wrote it.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from runtime.logging import configured_logging
from runtime.settings import Settings
from tests.support import death_registration, eventually, random_nino

pytestmark = pytest.mark.integration


async def _settled(pool: asyncpg.Pool, event_id: str) -> tuple[set[str], set[str]] | None:
    """(agencies decided on, agencies delivered to) once every delivery has a final receipt."""
    decisions = await pool.fetch(
        "SELECT agency, outcome FROM routing_decision WHERE event_id = $1", uuid.UUID(event_id)
    )
    receipted = {
        r["agency"]
        for r in await pool.fetch(
            "SELECT agency FROM delivery_receipt WHERE event_id = $1 AND outcome IN ('APPLIED', 'REJECTED')",
            uuid.UUID(event_id),
        )
    }
    delivered = {d["agency"] for d in decisions if d["outcome"] == "DELIVERED"}
    if not delivered or not delivered <= receipted:
        return None
    return {d["agency"] for d in decisions}, delivered


async def test_every_components_log_lines_about_an_event_carry_its_id_as_event_id(
    services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient, tmp_path: Path
) -> None:
    log_file = tmp_path / "bus.log"
    with configured_logging(
        services.model_copy(update={"log_level": "DEBUG", "log_format": "json"}), log_file
    ):
        body = death_registration(
            deceased={"given_names": "Ceri", "family_name": "Trail", "nino": random_nino()},
        )
        response = await intake.post("/v1/death-registrations", json=body)
        assert response.status_code == 201, response.text
        event_id = response.json()["event_id"]
        decided, delivered = await eventually(
            lambda: _settled(pool, event_id), timeout=90, what="a final receipt for every delivery"
        )

    lines = log_file.read_text().splitlines()
    about: list[dict[str, Any]] = []
    for line in lines:
        if event_id not in line:
            continue
        assert line.startswith("{"), f"not a structured line: {line}"
        about.append(json.loads(line))
    elsewhere = [e for e in about if e.get("event_id") != event_id]
    assert not elsewhere, f"lines naming the event under another key: {elsewhere}"

    def agencies(event: str) -> set[str]:
        return {e["agency"] for e in about if e["event"] == event}

    logged = {e["event"] for e in about}
    assert {"event_accepted", "event_published", "event_routed"} <= logged, logged  # intake, relay, router
    assert agencies("event_handled") == delivered, "each agency's consumer"
    assert agencies("decision_stored") == decided, "the tracker, for each routing decision"
    assert agencies("receipt_stored") >= delivered, "the tracker, for each receipt"
    assert len({e["event_id"] for e in about}) == 1

    def components(event: str) -> set[str]:
        return {e.get("component", "none") for e in about if e["event"] == event}

    # Which component wrote each line, as `tuo run` tags them (each in a process of its own).
    assert components("event_accepted") == {"intake"}
    assert components("event_published") == {"relay"}
    assert components("event_routed") == {"router"}
    assert components("event_handled") == {f"agency:{agency}" for agency in delivered}
    assert components("decision_stored") == {"tracker"}
