"""Routing decisions written from the router's template are the very bytes and headers
the contract's own path (the pydantic model, ``schemas.encode``, ``headers_for``) gives."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime

import pytest
from fastavro import schemaless_writer

from router.plan import DecisionWriter
from router.rules import Outcome, RoutingDecision
from runtime.kafka import Topics
from schemas import decode, encode, models
from schemas.cloudevents import CloudEvent, HeaderTemplate, headers_for
from schemas.codec import avro_string

SCHEMA_BASE = "http://127.0.0.1:8080/"


@pytest.mark.parametrize(
    "decision",
    [
        RoutingDecision(
            str(uuid.uuid4()),
            "DeathRegistered",
            "dwp",
            Outcome.DELIVERED,
            "Social Security Administration Act 1992",
            frozenset({"deceased", "nino", "surviving_partner.person"}),
            frozenset({"informant.name", "executor.nino"}),
        ),
        RoutingDecision(
            str(uuid.uuid4()), "BirthRegistered", "council-leeds", Outcome.WITHHELD_NO_CONSENT, None
        ),
        RoutingDecision(
            str(uuid.uuid4()),
            "AddressChanged",
            "hmrc",
            Outcome.BLOCKED,
            None,
            frozenset(),
            frozenset({"nino"}),
        ),
    ],
)
def test_a_decision_from_the_template_is_what_the_contract_writes(decision: RoutingDecision) -> None:
    at = datetime(2026, 12, 6, 14, 30, 1, 250_000, tzinfo=UTC)
    message = DecisionWriter(Topics("tuo"), at, SCHEMA_BASE).message(decision, b"s-subject")

    expected = encode(
        "RoutingDecision",
        models.RoutingDecision(
            event_id=uuid.UUID(decision.event_id),
            event_type=decision.event_type,
            agency=decision.agency,
            outcome=decision.outcome.value,
            legal_basis=decision.legal_basis,
            decided_at=at,
            fields_delivered=sorted(decision.fields_delivered),
            fields_withheld=sorted(decision.fields_withheld),
        ).avro(),
    )
    assert message.topic == "tuo.routing-decisions"
    assert message.key == b"s-subject"
    assert message.value == expected
    assert message.headers == headers_for(
        expected,
        id=f"{decision.event_id}/{decision.agency}",
        source="/router",
        subject="s-subject",
        time=at,
        schema_base_url=SCHEMA_BASE,
    )
    assert decode(message.value)[1]["fields_delivered"] == sorted(decision.fields_delivered)


@pytest.mark.parametrize("subject", [None, "s-1"])
@pytest.mark.parametrize("time", [None, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)])
@pytest.mark.parametrize("dataschema", [None, "http://127.0.0.1:8080/schemas/ids/7"])
def test_a_header_template_gives_what_the_cloud_event_gives(
    subject: str | None, time: datetime | None, dataschema: str | None
) -> None:
    template = HeaderTemplate(
        type="DeliveryReceipt", source="/agencies/dwp", time=time, dataschema=dataschema
    )
    event = CloudEvent(
        id="e-1",
        type="DeliveryReceipt",
        source="/agencies/dwp",
        time=time,
        subject=subject,
        dataschema=dataschema,
    )
    assert template.headers("e-1", subject) == event.headers()


def test_decisions_that_share_all_but_their_event_share_bytes_and_keep_their_own_event() -> None:
    """The fields after the event id are encoded once per batch and shape: a second event
    decided alike must still carry its own id (and an id of any length encodes as Avro's)."""
    at = datetime(2026, 12, 6, 14, 30, 1, tzinfo=UTC)
    writer = DecisionWriter(Topics("tuo"), at, SCHEMA_BASE)
    first, second = (
        RoutingDecision(str(uuid.uuid4()), "DeathRegistered", "dvla", Outcome.WITHHELD_NO_CONSENT, None)
        for _ in range(2)
    )
    for decision in (first, second, first):
        assert decode(writer.message(decision, b"s").value or b"")[1]["event_id"] == uuid.UUID(
            decision.event_id
        )


@pytest.mark.parametrize("text", ["", "a", "x" * 63, "x" * 64, "é" * 40, "long " * 5_000])
def test_an_avro_string_is_what_fastavro_writes(text: str) -> None:
    buffer = io.BytesIO()
    schemaless_writer(buffer, "string", text)
    assert avro_string(text) == buffer.getvalue()
