"""A message on an agency's topic as an HTTP request to the agency's webhook endpoint,
and when to try again: pure functions, no I/O.

The request is CloudEvents' HTTP binding in binary mode: each ``ce_*`` Kafka header
becomes a ``ce-*`` HTTP header with the same value, and the body is the message's value.
The office's and the router's signature headers (``tuo_sig*``) travel the same way, as
``tuo-sig*``, so the agency can check every field it was given against the office's
signature without trusting the bus. On top of that the whole request is signed with
Standard Webhooks (``webhook-id`` is the event id, the same on every attempt, so the
endpoint applies each event once; ``webhook-timestamp``; ``webhook-signature`` with each
of the agency's current secrets).

An agency chooses the body's format:

``avro``  the message's value as it is: Confluent framing and Avro binary
          (``content-type: application/avro``; ``ce-dataschema`` names the schema).
``json``  the decoded record as JSON, in the canonical form the office signed
          (``schemas.signatures.canonical``: dates as ``YYYY-MM-DD``, times in UTC with
          six decimals, null members left out), ``content-type: application/json``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from standardwebhooks import Webhook

from schemas import UndecodableMessage, decode
from schemas.signatures import UnsignableValue, canonical, canonical_json

FORMATS = ("avro", "json")
AVRO = "application/avro"
JSON = "application/json"
SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix of every secret, not one

# Kafka headers that travel with the request, by prefix; any other header stays on the bus.
_FORWARDED = ("ce_", "tuo_sig")
_HEADER_NAME = re.compile(r"[a-z0-9_]{1,64}")  # ce_* and tuo_sig* as the bus writes them
MAX_HEADER_VALUE = 64 * 1024  # far above a real signature manifest; an HTTP server refuses more


class NotDeliverable(ValueError):
    """A message that cannot be made into a webhook request (it goes to dead letters)."""


def forwarded_headers(kafka_headers: Sequence[tuple[str, bytes]]) -> list[tuple[str, str]]:
    """The Kafka headers the request carries, as (name, text) pairs, in order. Raises
    ``NotDeliverable`` when one cannot be an HTTP header value, or ``ce_id`` is missing."""
    kept: list[tuple[str, str]] = []
    for name, raw in kafka_headers:
        if not name.startswith(_FORWARDED):
            continue
        if not _HEADER_NAME.fullmatch(name):
            raise NotDeliverable("a header's name cannot be an HTTP header name")
        try:
            text = bytes(raw).decode("ascii")
        except UnicodeDecodeError:
            raise NotDeliverable(f"header {name} is not ASCII text") from None
        if len(text) > MAX_HEADER_VALUE or not all(" " <= c <= "~" for c in text):
            raise NotDeliverable(f"header {name} cannot be an HTTP header value")
        kept.append((name, text))
    names = [name for name, _ in kept]
    if names.count("ce_id") != 1 or names.count("ce_type") != 1:
        raise NotDeliverable("a message needs exactly one ce_id and one ce_type header")
    return kept


def body(value: bytes, payload_format: str) -> tuple[bytes, str]:
    """(the request body, its content type) for a message value in the agency's format."""
    if payload_format == "avro":
        return value, AVRO
    if payload_format != "json":
        raise ValueError(f"unknown payload format {payload_format!r}; one of {', '.join(FORMATS)}")
    try:
        _, record = decode(value)
        return canonical_json(canonical(record)), JSON
    except (UndecodableMessage, UnsignableValue) as exc:
        raise NotDeliverable(f"the value cannot be written as JSON: {exc}") from exc


def http_headers(
    forwarded: Sequence[tuple[str, str]],
    *,
    content_type: str,
    webhook_id: str,
    body: bytes,
    secrets: Sequence[str],
    now: datetime,
) -> dict[str, str]:
    """Every header of one attempt: the CloudEvents and signature headers, the content
    type, and the Standard Webhooks signature made now with each secret."""
    headers = {name.replace("_", "-"): value for name, value in forwarded}
    headers["content-type"] = content_type  # CloudEvents binary mode: the datacontenttype
    headers["webhook-id"] = webhook_id
    headers["webhook-timestamp"] = str(int(now.timestamp()))
    headers["webhook-signature"] = " ".join(Webhook(s).sign(webhook_id, now, body) for s in secrets)
    return headers


def kafka_headers(http: dict[str, str]) -> list[tuple[str, bytes]]:
    """The receiving side: the ``ce-*`` and ``tuo-sig*`` headers of a request as the Kafka
    headers they were (what the SDK's checks read)."""
    found: list[tuple[str, bytes]] = []
    for name, value in http.items():
        lowered = name.lower()
        if lowered.startswith(("ce-", "tuo-sig")):
            found.append((lowered.replace("-", "_"), value.encode()))
    return found


# --- when to try again --------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: the n-th failed attempt waits between half and
    all of ``first * 2**(n-1)``, at most ``longest`` (so a fleet of deliveries that failed
    together does not come back together)."""

    first: float = 1.0
    longest: float = 3600.0

    def delay(self, failed_attempts: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.longest, self.first * 2.0 ** min(failed_attempts - 1, 60))
        jitter: float = (rng or random).random()
        return ceiling * (0.5 + 0.5 * jitter)


@dataclass
class CircuitBreaker:
    """An endpoint that keeps failing is left alone for a while: after ``threshold``
    failures in a row the circuit opens for ``cool_down`` seconds; then one attempt is let
    through (half open), and its success closes the circuit, its failure opens it again
    for twice as long (up to ``longest``)."""

    threshold: int = 5
    cool_down: float = 30.0
    longest: float = 600.0
    failures: int = 0
    opened_for: float = 0.0
    open_until: float = 0.0  # monotonic seconds

    def allows(self, now: float) -> int | None:
        """How many attempts may start now (None: no limit from the breaker)."""
        if self.failures < self.threshold:
            return None
        return 1 if now >= self.open_until else 0

    def succeeded(self) -> None:
        self.failures = 0
        self.opened_for = 0.0

    def failed(self, now: float) -> None:
        self.failures += 1
        if self.failures >= self.threshold and now >= self.open_until:
            self.opened_for = min(self.longest, self.opened_for * 2 if self.opened_for else self.cool_down)
            self.open_until = now + self.opened_for

    @property
    def state(self) -> str:
        return "closed" if self.failures < self.threshold else "open"
