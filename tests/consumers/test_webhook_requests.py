"""Webhook requests as pure functions: the headers an agency's endpoint gets, the body in
its chosen format, the Standard Webhooks signature it checks, and when the bridge tries
again. No broker, no database."""

from __future__ import annotations

import json
import random
from datetime import UTC, date, datetime, timedelta

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from consumers.webhooks.endpoints import NotAWebhookUrl, checked_url, new_secret
from consumers.webhooks.requests import (
    AVRO,
    JSON,
    CircuitBreaker,
    NotDeliverable,
    RetryPolicy,
    body,
    forwarded_headers,
    http_headers,
    kafka_headers,
)
from schemas import decode, encode
from tests.golden.make_vectors import EXAMPLES

EVENT_ID = "5f0c6a57-8a55-4f0b-9a43-0b8f1f6f2d11"
KAFKA_HEADERS = [
    ("ce_specversion", b"1.0"),
    ("ce_id", EVENT_ID.encode()),
    ("ce_type", b"uk.gov.tellusonce.DeathRegistered"),
    ("ce_source", b"/offices/leeds"),
    ("content-type", b"application/avro"),
    ("ce_subject", b"subj-1"),
    ("tuo_sig", b"c2lnbmF0dXJl"),
    ("tuo_sig_manifest", b'{"alg":"Ed25519","digests":["a"]}'),
    ("tuo_sig_salts", b'{"envelope":"x"}'),
    ("tuo_redeliver_to", b"hmrc"),  # the bus's own routing header: stays on the bus
]


def test_the_cloudevents_and_signature_headers_travel_and_nothing_else() -> None:
    forwarded = forwarded_headers(KAFKA_HEADERS)
    names = [name for name, _ in forwarded]
    assert names == [
        "ce_specversion",
        "ce_id",
        "ce_type",
        "ce_source",
        "ce_subject",
        "tuo_sig",
        "tuo_sig_manifest",
        "tuo_sig_salts",
    ]
    headers = http_headers(
        forwarded,
        content_type=AVRO,
        webhook_id=EVENT_ID,
        body=b"x",
        secrets=[new_secret()],
        now=datetime.now(UTC),
    )
    assert headers["ce-id"] == EVENT_ID and headers["ce-type"] == "uk.gov.tellusonce.DeathRegistered"
    assert headers["tuo-sig-manifest"] == '{"alg":"Ed25519","digests":["a"]}'
    assert headers["content-type"] == AVRO and headers["webhook-id"] == EVENT_ID
    # The receiving side gets back exactly the Kafka headers that were forwarded.
    assert kafka_headers(headers) == [(n, v.encode()) for n, v in forwarded]


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ([("ce_type", b"x")], "exactly one ce_id"),
        ([("ce_id", b"1"), ("ce_id", b"2"), ("ce_type", b"x")], "exactly one ce_id"),
        ([("ce_id", b"1"), ("ce_type", "D\u00e9c\u00e8s".encode())], "not ASCII"),
        ([("ce_id", b"1\r\nX-Injected: yes"), ("ce_type", b"x")], "cannot be an HTTP header value"),
        ([("ce_id", b"1"), ("ce_type", b"x"), ("tuo_sig", b"a" * 70_000)], "cannot be an HTTP header value"),
    ],
    ids=["no-id", "two-ids", "not-ascii", "header-injection", "oversized"],
)
def test_a_message_that_cannot_be_a_request_is_refused_with_why(
    headers: list[tuple[str, bytes]], why: str
) -> None:
    with pytest.raises(NotDeliverable, match=why):
        forwarded_headers(headers)


def test_the_endpoint_verifies_the_standard_webhooks_signature_with_the_library() -> None:
    secret = new_secret()
    payload = b"\x00\x00\x00\x00\x07avro bytes, not UTF-8: \xff"
    headers = http_headers(
        [], content_type=AVRO, webhook_id=EVENT_ID, body=payload, secrets=[secret], now=datetime.now(UTC)
    )
    Webhook(secret).verify(payload, headers, json_parse=False)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(payload + b"!", headers, json_parse=False)  # altered on the way
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(payload, headers, json_parse=False)  # someone else's secret
    stale = http_headers(
        [],
        content_type=AVRO,
        webhook_id=EVENT_ID,
        body=payload,
        secrets=[secret],
        now=datetime.now(UTC) - timedelta(minutes=10),
    )
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(payload, stale, json_parse=False)  # replayed later


def test_while_a_secret_rotates_either_one_verifies() -> None:
    old, new = new_secret(), new_secret()
    headers = http_headers(
        [], content_type=AVRO, webhook_id=EVENT_ID, body=b"b", secrets=[new, old], now=datetime.now(UTC)
    )
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(b"b", headers, json_parse=False)
    Webhook(new).verify(b"b", headers, json_parse=False)


def test_a_json_body_is_the_record_in_the_signed_canonical_form() -> None:
    record = dict(EXAMPLES["DeathRegistered"])
    value = encode("DeathRegistered", record)
    assert body(value, "avro") == (value, AVRO)
    text, content_type = body(value, "json")
    assert content_type == JSON
    parsed = json.loads(text)
    _, decoded = decode(value)
    assert parsed["date_of_death"] == decoded["date_of_death"].isoformat()
    assert isinstance(decoded["date_of_death"], date)
    assert parsed["envelope"]["event_id"] == str(decoded["envelope"]["event_id"])
    assert parsed["envelope"]["recorded_at"].endswith("Z")
    assert None not in parsed.values()  # a null member is left out, as the office signed it
    with pytest.raises(NotDeliverable, match="cannot be written as JSON"):
        body(b"\x00\x00\x00\x99\x99not avro", "json")


def test_retries_back_off_exponentially_with_jitter_up_to_a_ceiling() -> None:
    policy = RetryPolicy(first=1.0, longest=60.0)
    rng = random.Random(7)
    for failed in range(1, 12):
        ceiling = min(60.0, 2.0 ** (failed - 1))
        delays = [policy.delay(failed, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), failed
        assert max(delays) - min(delays) > ceiling / 4  # spread out, not in step
    assert policy.delay(10_000, rng) <= 60.0


def test_a_failing_endpoint_trips_the_breaker_then_gets_one_probe() -> None:
    breaker = CircuitBreaker(threshold=3, cool_down=10.0, longest=25.0)
    for now in (0.0, 1.0):
        breaker.failed(now)
        assert breaker.allows(now) is None  # still closed: no limit from the breaker
    breaker.failed(2.0)
    assert breaker.state == "open" and breaker.allows(5.0) == 0
    assert breaker.allows(12.0) == 1  # half open: one attempt
    breaker.failed(12.5)
    assert breaker.allows(20.0) == 0 and breaker.allows(32.6) == 1  # open twice as long
    breaker.failed(33.0)
    assert breaker.allows(57.0) == 0 and breaker.allows(58.1) == 1  # at most `longest`
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.allows(58.2) is None


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://agency.example/hook", "https://"),
        ("https:///hook", "no host"),
        ("https://user:pw@agency.example/hook", "user name or password"),
        ("https://agency.example/hook#x", "fragment"),
        ("https://agency.example/ho ok", "spaces"),
        ("https://agency.example:99999/hook", "port"),
        ("https://agency.example/" + "a" * 2000, "longer than"),
        ("javascript:alert(1)", "https://"),
    ],
    ids=["http", "no-host", "credentials", "fragment", "space", "port", "long", "javascript"],
)
def test_only_a_plain_https_url_can_be_an_endpoint(url: str, why: str) -> None:
    with pytest.raises(NotAWebhookUrl, match=why):
        checked_url(url)
    assert (
        checked_url(" https://agency.example:8443/tuo/events?x=1 ")
        == "https://agency.example:8443/tuo/events?x=1"
    )
