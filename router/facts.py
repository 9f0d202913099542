"""Routing facts: what deciding on a stored event and cutting each agency's copy of it
needs, kept beside the event when it is recorded.

The router reads every event it routes: decodes it, checks its office's signature
and cuts each copy by decoding and encoding. A replay of years of events would do
all of that again for every one. So when intake records an event it keeps, sealed
with the data key beside the sealed event (``outbox.routing_facts``), the facts
replay needs:

- what the routing rules look at (``router.rules.RoutableEvent``: type, subject,
  postcodes and local authorities of the subject's addresses);
- the ``ce_*`` attributes every copy carries;
- the office's signature headers, as intake made them;
- where each withholdable part lies in the event's bytes (``schemas.spans``), and
  which signed items have a value, so a copy is spliced, not re-encoded.

They are read from the event exactly as the router reads it (``routable``), so a
replay decides on what the router would. Sealed with the event's data key and bound
to its id, they cannot be altered or moved to another event without the key. An
event recorded before they were kept, or a correction or void (rare, and decided
with their originals), has none: replay reads it the router's way.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiokafka.structs import ConsumerRecord
from pydantic_core import from_json

from router.messages import FOLLOW_UPS, Outgoing, UnroutableEvent, routable
from router.minimise import disclosed, event_fields, splice, valued_items
from router.rules import RoutableEvent, RoutingDecision
from runtime.sealing import CannotOpen, PayloadSealer
from schemas.catalogue import DISCLOSURE_SUFFIX, active
from schemas.cloudevents import CloudEvent, KafkaHeaders
from schemas.signatures import b64encode, disclosing_these, plain, salts_template, three_headers
from schemas.spans import NotSpliceable, Spans, locate

VERSION = 1
_BINDING = b"routing-facts:"  # sealed for this use and this event: never opened as the event itself


@dataclass(frozen=True)
class RoutingFacts:
    """A stored original life event as replay decides on it; never a correction or void,
    and never an operator's redelivery (the ``follows`` and ``redeliver_to`` of
    ``router.messages.Incoming``, which the shared decision pipeline asks about)."""

    event: RoutableEvent
    source: str  # ce_source
    time: datetime  # ce_time: when the event happened, as the office said
    spans: Spans
    valued: tuple[str, ...]  # the signed items that have a value
    signature: bytes  # the tuo_sig header, as the office signed
    manifest: bytes  # the tuo_sig_manifest header
    salts: tuple[str, ...]  # each valued item's salt, in their order, from the tuo_sig_salts header
    follows: None = None
    redeliver_to: None = None

    def copy(
        self,
        topic: str,
        value: bytes,
        decision: RoutingDecision,
        dataschema: str,
        extra: Sequence[tuple[str, bytes]] = (),
    ) -> Outgoing:
        """The agency's copy of the event whose bytes are ``value``: what
        ``router.messages.agency_copy`` makes of it, spliced from ``value``.
        ``dataschema``: the disclosure schema's URL."""
        event = self.event
        fields = decision.fields_delivered
        headers = CloudEvent(
            id=event.event_id,
            type=event.event_type,
            source=self.source,
            time=self.time,
            subject=event.subject_id,
            dataschema=dataschema,
        ).headers()
        names, order, template = _disclosure(event.event_type, fields, self.valued)
        salts = [self.salts[i] for i in order]
        if template is None:
            headers += disclosing_these(self.signature, self.manifest, names, salts)
        else:  # every salt was found plain when the facts were opened
            headers += three_headers(self.signature, self.manifest, (template % tuple(salts)).encode())
        headers += extra
        value = splice(event.event_type, value, self.spans, fields)
        return Outgoing(topic, event.subject_id.encode(), value, headers)


@functools.lru_cache(maxsize=4096)
def _disclosure(
    event_type: str, fields: frozenset[str], valued: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[int, ...], str | None]:
    """The items a copy carrying ``fields`` discloses the salts of (sorted, as the salts
    header lists them), where each is in ``valued``, and the salts header's template: the
    same for most events of a type, so worked out once, not once per event and agency."""
    shown = disclosed(event_type, fields, valued)
    names = sorted(name for name in set(valued) if name in shown)
    position = {name: n for n, name in enumerate(valued)}
    return tuple(names), tuple(position[name] for name in names), salts_template(names)


def dataschema(schema_base_url: str, event_type: str) -> str:
    """The ``ce_dataschema`` of an agency's copy of an ``event_type``."""
    schema_id = active().latest(f"{event_type}{DISCLOSURE_SUFFIX}").schema_id
    return f"{schema_base_url.rstrip('/')}/schemas/ids/{schema_id}"


def seal(
    sealer: PayloadSealer, event_id: uuid.UUID, key: bytes, value: bytes, headers: KafkaHeaders
) -> bytes | None:
    """The event's routing facts, sealed; ``None`` when replay must read it the router's
    way (a correction or void, an event the router could not route, or bytes that
    splicing does not handle)."""
    record = ConsumerRecord(
        topic="",
        partition=-1,
        offset=-1,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=-1,
        serialized_value_size=-1,
        headers=list(headers),
    )
    try:
        incoming = routable(record)
        spans = locate(incoming.event.event_type, value)
    except (UnroutableEvent, NotSpliceable):
        return None
    if incoming.follows is not None or incoming.time is None or incoming.event.event_type in FOLLOW_UPS:
        return None
    event = incoming.event
    valued = list(valued_items(event.event_type, incoming.body))
    if any(name not in incoming.signed.salts for name in valued):
        return None  # the router would not route it: verification finds the salt missing
    facts = {
        "v": VERSION,
        "id": event.event_id,
        "type": event.event_type,
        "subject": event.subject_id,
        "postcodes": sorted(event.postcodes),
        "authorities": sorted(event.local_authorities),
        "area_unknown": event.area_unknown,
        "source": incoming.source,
        "time": incoming.time.isoformat(),
        "spans": spans.as_json(),
        "valued": valued,
        "sig": b64encode(incoming.signed.signature),  # as the tuo_sig header carries it
        # The salt of each valued item (the only ones a copy discloses), in their order.
        "salts": [incoming.signed.salts[name] for name in valued],
    }
    # The manifest after a newline (JSON that holds none), as it is, not escaped as a string.
    written = json.dumps(facts, separators=(",", ":")).encode() + b"\n" + incoming.signed.manifest_bytes
    return sealer.seal(written, _BINDING + event_id.bytes)


def opened(sealer: PayloadSealer, event_id: uuid.UUID, sealed: bytes) -> RoutingFacts:
    """The routing facts kept for ``event_id``. Raises ``CannotOpen`` when they were not
    sealed for it with a key this bus holds, ``ValueError`` when they do not read."""
    written, _, manifest = sealer.open(sealed, _BINDING + event_id.bytes).partition(b"\n")
    try:
        data: dict[str, Any] = from_json(written)  # pydantic's parser: about 1.5 times as fast as json here
    except ValueError as exc:
        raise ValueError(f"routing facts that are not JSON: {exc}") from None
    if data.get("v") != VERSION:
        raise ValueError(f"routing facts of version {data.get('v')!r}, not {VERSION}")
    event_type = data["type"]
    valued, salts = tuple(data["valued"]), tuple(data["salts"])
    if len(salts) != len(valued):
        raise ValueError(f"routing facts with {len(salts)} salts for {len(valued)} valued items")
    if not plain("".join(salts)):  # base64url, as intake keeps them; the salts header relies on it
        raise ValueError("routing facts with a salt that is not base64url")
    return RoutingFacts(
        event=RoutableEvent(
            event_id=data["id"],
            event_type=event_type,
            subject_id=data["subject"],
            fields=event_fields(event_type),
            postcodes=frozenset(data["postcodes"]),
            local_authorities=frozenset(data["authorities"]),
            area_unknown=data["area_unknown"],
        ),
        source=data["source"],
        time=datetime.fromisoformat(data["time"]),
        spans=Spans.from_json(data["spans"]),
        valued=valued,
        signature=data["sig"].encode(),
        manifest=manifest,
        salts=salts,
    )


__all__ = ["CannotOpen", "RoutingFacts", "dataschema", "opened", "seal"]
