"""CloudEvents Kafka binding, binary mode: the envelope travels in ``ce_*`` headers.

``ce_id`` is the event id that every consumer de-duplicates on; ``ce_type`` is
the schema's full name (also its registry subject); ``ce_subject`` is the
pseudonymous subject id (the message key); ``ce_dataschema`` points at the
writer schema in the registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from schemas.catalogue import active
from schemas.codec import schema_id_of

NAMESPACE = "uk.gov.tellusonce"
CONTENT_TYPE = "application/avro"

KafkaHeaders = list[tuple[str, bytes]]


class MissingCloudEventHeader(ValueError):
    """A message lacks a required ``ce_*`` header."""


@dataclass(frozen=True)
class CloudEvent:
    id: str
    type: str  # the schema name, e.g. "DeathRegistered"
    source: str  # a URI reference, e.g. "/offices/leeds-register-office"
    time: datetime | None = None
    subject: str | None = None  # the pseudonymous subject id, never a name or NINO
    dataschema: str | None = None  # URL of the writer schema in the registry

    def headers(self) -> KafkaHeaders:
        headers: KafkaHeaders = [
            ("ce_specversion", b"1.0"),
            ("ce_id", self.id.encode()),
            ("ce_type", f"{NAMESPACE}.{self.type}".encode()),
            ("ce_source", self.source.encode()),
            ("content-type", CONTENT_TYPE.encode()),
        ]
        if self.time is not None:
            headers.append(("ce_time", self.time.isoformat().replace("+00:00", "Z").encode()))
        if self.subject is not None:
            headers.append(("ce_subject", self.subject.encode()))
        if self.dataschema is not None:
            headers.append(("ce_dataschema", self.dataschema.encode()))
        return headers

    @classmethod
    def from_headers(cls, headers: Sequence[tuple[str, bytes]]) -> CloudEvent:
        found = {key: value.decode("utf-8", errors="replace") for key, value in headers}
        missing = [k for k in ("ce_id", "ce_type", "ce_source") if k not in found]
        if missing:
            raise MissingCloudEventHeader(f"message has no {', '.join(missing)} header")
        time = found.get("ce_time")
        return cls(
            id=found["ce_id"],
            type=found["ce_type"].removeprefix(f"{NAMESPACE}."),
            source=found["ce_source"],
            time=datetime.fromisoformat(time) if time else None,
            subject=found.get("ce_subject"),
            dataschema=found.get("ce_dataschema"),
        )


class HeaderTemplate:
    """The ``ce_*`` headers that many messages share (type, source, time, schema), encoded
    once: ``headers(id, subject)`` is exactly ``CloudEvent(id, …, subject, …).headers()``."""

    def __init__(
        self, *, type: str, source: str, time: datetime | None = None, dataschema: str | None = None
    ) -> None:
        shared = CloudEvent(id="", type=type, source=source, time=time, dataschema=dataschema).headers()
        self._first = shared[:1]  # ce_specversion; then ce_id
        self._middle = [h for h in shared[2:] if h[0] != "ce_dataschema"]  # type … time; then ce_subject
        self._last = [h for h in shared if h[0] == "ce_dataschema"]

    def headers(self, id: str, subject: str | None = None) -> KafkaHeaders:
        subjects = [] if subject is None else [("ce_subject", subject.encode())]
        return [*self._first, ("ce_id", id.encode()), *self._middle, *subjects, *self._last]


def headers_for(
    value: bytes,
    *,
    id: str,
    source: str,
    subject: str | None,
    time: datetime,
    schema_base_url: str,
    type: str | None = None,
) -> KafkaHeaders:
    """The full set of ``ce_*`` headers for an encoded value: ``ce_dataschema``
    (and, unless ``type`` is given, ``ce_type``) come from the schema id in the
    value's own framing. An agency's minimised copy keeps the event's type."""
    schema_id = schema_id_of(value)
    entry = active().by_id(schema_id)
    return CloudEvent(
        id=id,
        type=type or entry.name,
        source=source,
        time=time,
        subject=subject,
        dataschema=f"{schema_base_url.rstrip('/')}/schemas/ids/{schema_id}",
    ).headers()


# An operator's redelivery: the one agency it is for, and its id (headers beside the ce_* ones).
REDELIVER_TO = "tuo_redeliver_to"
REDELIVERY_ID = "tuo_redelivery_id"
