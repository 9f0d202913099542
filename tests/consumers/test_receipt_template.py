"""Receipts written from the SDK's template are the very bytes and headers the
contract's own path (the pydantic model, ``schemas.encode``, ``headers_for``) gives."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from consumers.receipts import Receipt, ReceiptWriter
from schemas import decode, encode, models
from schemas.cloudevents import headers_for

SCHEMA_BASE = "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    "receipt",
    [
        Receipt(str(uuid.uuid4()), "APPLIED", None),
        Receipt(str(uuid.uuid4()), "REJECTED", "no pension award for this National Insurance number"),
        Receipt(str(uuid.uuid4()), "RECEIVED", None),
        Receipt(str(uuid.uuid4()), "APPLIED", None, duplicate=True),
    ],
)
def test_a_receipt_from_the_template_is_what_the_contract_writes(receipt: Receipt) -> None:
    issued_at = datetime.now(UTC)
    received_at = issued_at - timedelta(seconds=2)
    writer = ReceiptWriter("dwp", SCHEMA_BASE)
    key, value, headers = writer.message(
        receipt,
        key=b"s-subject",
        repeat_at="0-41",
        issued_at=issued_at,
        received_at=received_at,
        headers=writer.headers(issued_at),
    )

    expected = encode(
        "DeliveryReceipt",
        models.DeliveryReceipt(
            event_id=uuid.UUID(receipt.event_id),
            agency="dwp",
            outcome=receipt.outcome,
            reason=receipt.reason,
            issued_at=issued_at,
            received_at=received_at,
            duplicate=receipt.duplicate,
        ).avro(),
    )
    receipt_id = f"{receipt.event_id}/dwp/{receipt.outcome}" + ("/repeat/0-41" if receipt.duplicate else "")
    assert key == b"s-subject"
    assert value == expected
    assert sorted(headers) == sorted(
        headers_for(
            expected,
            id=receipt_id,
            source="/agencies/dwp",
            subject="s-subject",
            time=issued_at,
            schema_base_url=SCHEMA_BASE,
        )
    )
    assert decode(value)[1]["outcome"] == receipt.outcome
