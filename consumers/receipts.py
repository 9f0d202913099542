"""Delivery receipts as an agency writes them: encoded from a template made once per
consumer, without a pydantic model per receipt.

The bytes are what ``schemas.encode("DeliveryReceipt", …)`` writes (the Confluent
framing and the latest schema), and the headers what ``schemas.cloudevents.headers_for``
gives (``tests/consumers/test_receipt_template.py`` holds the two side by side).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastavro import schemaless_writer

from schemas.catalogue import active
from schemas.cloudevents import HeaderTemplate
from schemas.codec import HEADER, MAGIC_BYTE

RECEIPT = "DeliveryReceipt"
OUTCOMES = ("RECEIVED", "APPLIED", "REJECTED")


@dataclass(frozen=True)
class Receipt:
    event_id: str
    outcome: str  # RECEIVED, APPLIED or REJECTED
    reason: str | None
    duplicate: bool = False  # the agency had handled and receipted this event before


class ReceiptWriter:
    """Receipts of one agency: everything that is the same for each of them is made once."""

    def __init__(self, agency: str, schema_base_url: str) -> None:
        entry = active().latest(RECEIPT)
        self.agency = agency
        self._parsed = entry.parsed
        self._framing = HEADER.pack(MAGIC_BYTE, entry.schema_id)
        self._type = entry.name
        self._source = f"/agencies/{agency}"
        self._dataschema = f"{schema_base_url.rstrip('/')}/schemas/ids/{entry.schema_id}"

    def value(self, receipt: Receipt, issued_at: datetime, received_at: datetime) -> bytes:
        record: dict[str, Any] = {
            "event_id": receipt.event_id,
            "agency": self.agency,
            "outcome": receipt.outcome,
            "reason": receipt.reason,
            "issued_at": issued_at,
            "received_at": received_at,
            "duplicate": receipt.duplicate,
        }
        buffer = io.BytesIO()
        buffer.write(self._framing)
        schemaless_writer(buffer, self._parsed, record)
        return buffer.getvalue()

    def headers(self, issued_at: datetime) -> HeaderTemplate:
        """The ``ce_*`` headers of receipts issued at ``issued_at``, made once for a whole batch."""
        return HeaderTemplate(
            type=self._type, source=self._source, time=issued_at, dataschema=self._dataschema
        )

    def message(
        self,
        receipt: Receipt,
        *,
        key: bytes | None,
        repeat_at: str | None,
        issued_at: datetime,
        received_at: datetime,
        headers: HeaderTemplate,
    ) -> tuple[bytes | None, bytes, Sequence[tuple[str, bytes]]]:
        """(key, value, headers) of one receipt. A duplicate's id names where the repeated
        delivery was read (``repeat_at``, "<partition>-<offset>"): one receipt per repeat."""
        receipt_id = f"{receipt.event_id}/{self.agency}/{receipt.outcome}"
        if receipt.duplicate:
            receipt_id += f"/repeat/{repeat_at}"
        subject = key.decode(errors="replace") if key else None
        return key, self.value(receipt, issued_at, received_at), headers.headers(receipt_id, subject)
