"""Routing facts (``router.facts``): a replay's copy cut from them is the router's copy."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router import facts
from router.messages import agency_copy, routable
from router.minimise import event_fields
from router.rules import Outcome, RoutingDecision
from runtime.kafka import Topics
from runtime.sealing import CannotOpen, PayloadSealer
from schemas import encode
from schemas.cloudevents import headers_for
from schemas.signatures import SIGNATURE_HEADERS, office_source, signature_headers
from tests.router.test_minimisation import life_events
from tests.schemas.test_signatures import KEY, OFFICE

BASE_URL = "http://127.0.0.1:8080"
TOPICS = Topics("tuo")
SEALER = PayloadSealer(base64.urlsafe_b64encode(bytes(32)).decode())


Message = tuple[uuid.UUID, bytes, bytes, list[tuple[str, bytes]]]  # event id, key, value, headers


def _message(event_type: str, record: dict[str, Any]) -> Message:
    """An event as intake stores it: id, key, value and headers (``ce_*`` and the office's signature)."""
    event_id = record["envelope"]["event_id"]
    subject_id = record["envelope"]["subject"]["subject_id"]
    value = encode(event_type, record)
    headers = headers_for(
        value,
        id=event_id,
        source=office_source(OFFICE),
        subject=subject_id,
        time=datetime.now(UTC),
        schema_base_url=BASE_URL,
    )
    headers += signature_headers(KEY.signing, event_type, record, event_id)
    return uuid.UUID(event_id), subject_id.encode(), value, headers


def _record(key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("tuo.life-events", 0, 0, 0, 0, key, value, None, -1, -1, headers)


@given(event=life_events(), data=st.data())
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_copy_from_routing_facts_is_the_routers_copy(
    event: tuple[str, dict[str, Any]], data: st.DataObject
) -> None:
    """Topic, key, value and every header, for any event and any grant."""
    event_type, record = event
    event_id, key, value, headers = _message(event_type, record)
    sealed = facts.seal(SEALER, event_id, key, value, headers)
    assert sealed is not None
    kept = facts.opened(SEALER, event_id, sealed)
    incoming = routable(_record(key, value, headers))
    assert kept.event == incoming.event
    paths = sorted(event_fields(event_type))
    for granted in data.draw(st.lists(st.frozensets(st.sampled_from(paths)), min_size=1, max_size=4)):
        decision = RoutingDecision(str(event_id), event_type, "dwp", Outcome.DELIVERED, "statutory", granted)
        made = kept.copy(TOPICS.agency("dwp"), value, decision, facts.dataschema(BASE_URL, event_type))
        assert made == agency_copy(TOPICS, incoming, decision, BASE_URL)


def _death() -> Message:
    from tests.golden.make_vectors import EXAMPLES

    record = dict(EXAMPLES["DeathRegistered"])
    record["envelope"] = {
        **record["envelope"],
        "event_id": str(uuid.uuid4()),
        "registration_office": OFFICE,
        "subject": {"subject_id": f"s-{uuid.uuid4().hex}", "nino": None},
    }
    return _message("DeathRegistered", record)


def test_routing_facts_open_only_for_their_own_event_and_with_the_key_that_sealed_them() -> None:
    event_id, key, value, headers = _death()
    sealed = facts.seal(SEALER, event_id, key, value, headers)
    assert sealed is not None
    with pytest.raises(CannotOpen):
        facts.opened(SEALER, uuid.uuid4(), sealed)  # moved to another event
    with pytest.raises(CannotOpen):
        SEALER.open(sealed, event_id)  # never taken for the event itself
    with pytest.raises(CannotOpen):
        facts.opened(PayloadSealer(base64.urlsafe_b64encode(bytes([1]) * 32).decode()), event_id, sealed)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(CannotOpen):
        facts.opened(SEALER, event_id, tampered)


def test_an_event_the_router_could_not_route_keeps_no_facts() -> None:
    """Replay then reads it the router's way, which refuses it as the router did."""
    event_id, key, value, headers = _death()
    unsigned = [(k, v) for k, v in headers if k not in SIGNATURE_HEADERS]
    assert facts.seal(SEALER, event_id, key, value, unsigned) is None
    assert facts.seal(SEALER, event_id, b"someone-else", value, headers) is None
    assert facts.seal(SEALER, event_id, key, value[:-2], headers) is None


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda d: {**d, "salts": [*d["salts"][:-1], 'x"}']}, "not base64url"),
        (lambda d: {**d, "salts": d["salts"][:-1]}, "salts for"),
        (lambda d: {**d, "v": 99}, "version 99"),
    ],
)
def test_routing_facts_that_do_not_read_are_refused_so_replay_reads_the_event_instead(
    change: Any, why: str
) -> None:
    """Sealed with the right key, yet not as intake writes them (a bug, or an older bus):
    ``ValueError``, on which replay reads and verifies the event the router's way. A salt
    that would need escaping never reaches the salts header's fast path."""
    event_id, key, value, headers = _death()
    sealed = facts.seal(SEALER, event_id, key, value, headers)
    assert sealed is not None
    binding = b"routing-facts:" + event_id.bytes
    written, _, manifest = SEALER.open(sealed, binding).partition(b"\n")
    altered = json.dumps(change(json.loads(written))).encode() + b"\n" + manifest
    with pytest.raises(ValueError, match=why):
        facts.opened(SEALER, event_id, SEALER.seal(altered, binding))
    with pytest.raises(ValueError, match="not JSON"):
        facts.opened(SEALER, event_id, SEALER.seal(b"{not json\n" + manifest, binding))
