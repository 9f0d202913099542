"""Write golden vectors for schema versions that have none yet.

    .venv/bin/python -m tests.golden.make_vectors

Each vector is a Confluent-framed message (``<Name>.v<N>.bin``) and the record
it must decode to (``<Name>.v<N>.json``). Vectors are written once, committed,
and never regenerated: ``tests/schemas/test_golden_vectors.py`` decodes them forever.
"""

from __future__ import annotations

import io
import json
import struct
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from fastavro import schemaless_reader, schemaless_writer

from router.minimise import minimise, minimise_envelope
from schemas.catalogue import CATALOGUE, CatalogueEntry
from tests.golden.jsonable import jsonable

HERE = Path(__file__).parent
WHEN = datetime(2026, 11, 21, 9, 30, 15, 123456, tzinfo=UTC)
ADDRESS = {
    "lines": ["1 Example Street", "Chapel Allerton"],
    "town": "Leeds",
    "postcode": "LS7 3AB",
    "uprn": "72000001",
    "local_authority": "E08000035",  # Leeds; written from Address v2 on (v1 has no such field)
}
PERSON = {"given_names": "Pat Jo", "family_name": "Example-Smith", "date_of_birth": date(1941, 3, 2)}
RELATED = {
    "person": {"given_names": "Chris", "family_name": "Example", "date_of_birth": None},
    "relationship": "wife",
    "nino": "CE112233D",
    "address": ADDRESS,
}
SUBJECT_ID = "n-6f1d0b9e7c1e3c1a4d6e9a573f1f6d0c"
ENVELOPE: dict[str, Any] = {
    "event_id": "0b9e7c1e-3c1a-4d6e-9a57-3f1f6d0c2a11",
    "reference": "TUO-2026-7F3K-9QXD",
    "occurred_at": datetime(2026, 11, 18, tzinfo=UTC),
    "recorded_at": WHEN,
    "subject": {"subject_id": SUBJECT_ID, "nino": "AB123456C"},
    "informant": {"name": "Alex Example", "relationship": "son"},
    "channel": "DESK",
    "registration_office": "Leeds Register Office",
    "provenance": {"source_system": "tuo-intake-api", "recorded_by": "registrar-17"},
}
EXAMPLES: dict[str, dict[str, Any]] = {
    "BirthRegistered": {
        "envelope": ENVELOPE,
        "child": {**PERSON, "date_of_birth": date(2026, 11, 11)},
        "place_of_birth": "St James's University Hospital",
        "registration_district": "Leeds",
        "parents": [RELATED],
        "home_address": ADDRESS,
    },
    "DeathRegistered": {
        "envelope": ENVELOPE,
        "deceased": PERSON,
        "date_of_death": date(2026, 11, 18),
        "place_of_death": "Leeds General Infirmary",
        "last_address": ADDRESS,
        "surviving_partner": RELATED,
        "next_of_kin": [RELATED],
        "executor": None,
        # Derived facts (schemas/derived.py), written out: born 2 March 1941, died 18 November 2026.
        "deceased_age_band": "85 and over",
        "deceased_over_18": True,
        "last_address_local_authority": "E08000035",
    },
    "AddressChanged": {
        "envelope": {**ENVELOPE, "channel": "ONLINE"},
        "person": PERSON,
        "old_address": ADDRESS,
        "new_address": {**ADDRESS, "postcode": "LS6 2AB", "uprn": None},
        "effective_date": date(2026, 11, 1),
        "moving_with": [RELATED],
    },
    "EventCorrected": {
        "envelope": ENVELOPE,
        "corrects_event_id": "5a3e8f2c-1111-4c2b-8d2e-0c5a3e8f2c11",
        "corrects_reference": "TUO-2026-AAAA-BBBB",
        "corrected_event_type": "DeathRegistered",
        "changes": [
            {"field": "deceased.date_of_birth", "new_value_json": '"1941-03-12"'},
            {"field": "nino", "new_value_json": '"QQ123456C"'},
        ],
        "reason": "Date of birth and National Insurance number misread from the medical certificate",
        "previous_subject_id": SUBJECT_ID,
        "new_subject_id": "n-8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a",
    },
    "EventVoided": {
        "envelope": ENVELOPE,
        "voids_event_id": "5a3e8f2c-1111-4c2b-8d2e-0c5a3e8f2c11",
        "voids_reference": "TUO-2026-AAAA-BBBB",
        "voided_event_type": "BirthRegistered",
        "reason": "Registered twice in error",
    },
    "ServicesRequested": {
        "envelope": {**ENVELOPE, "channel": "ONLINE"},
        "requests_event_id": "5a3e8f2c-1111-4c2b-8d2e-0c5a3e8f2c11",
        "requests_reference": "TUO-2026-AAAA-BBBB",
        "requested_event_type": "DeathRegistered",
        "person": PERSON,
        "date_of_death": date(2026, 11, 18),
        "address": ADDRESS,
        "driving_licence_number": "EXAMP403021PJ9XY",
        "passport_number": "123456789",
        "blue_badge_number": None,
    },
    "DeliveryReceipt": {
        "event_id": ENVELOPE["event_id"],
        "agency": "dwp",
        "outcome": "REJECTED",
        "reason": "no matching claimant",
        "issued_at": WHEN,
        "received_at": datetime(2026, 11, 21, 9, 30, 14, 1, tzinfo=UTC),
        "duplicate": True,
    },
    "RoutingDecision": {
        "event_id": ENVELOPE["event_id"],
        "event_type": "DeathRegistered",
        "agency": "hmrc",
        "outcome": "DELIVERED",
        "legal_basis": "statutory: Registration Service Act 1953 s.19AA",
        "decided_at": WHEN,
        "fields_delivered": ["date_of_death", "deceased", "executor", "last_address", "nino"],
        "fields_withheld": ["next_of_kin", "place_of_death", "surviving_partner"],
        "subscription_version": 17,
    },
    "ConsentChanged": {
        "change_id": "9d2c4f7a-2222-4b1e-9c3d-7a9d2c4f7a22",
        "subject_id": SUBJECT_ID,
        "agency": "dvla",
        "event_type": "DeathRegistered",
        "choice": "WITHDRAWN",
        "recorded_by": "CITIZEN",
        "recorded_at": WHEN,
    },
}


def _by_top_level_field(record: dict[str, Any], delivered: frozenset[str]) -> dict[str, Any]:
    """How agencies' copies were minimised before field paths (the *Delivery schemas)."""
    envelope = dict(record["envelope"])
    if "nino" not in delivered:
        envelope["subject"] = {**envelope["subject"], "nino": None}
    fields = {name for name in record if name != "envelope"}
    copy_ = {"envelope": envelope, **{n: (record[n] if n in delivered else None) for n in fields}}
    copy_["withheld_fields"] = sorted((fields | {"nino"}) - delivered)
    return copy_


# What an agency with a narrow subscription receives (dvla's fields for a death).
EXAMPLES["DeathRegisteredDelivery"] = _by_top_level_field(
    EXAMPLES["DeathRegistered"], frozenset({"deceased", "date_of_death", "last_address"})
)
EXAMPLES["BirthRegisteredDelivery"] = _by_top_level_field(
    EXAMPLES["BirthRegistered"], frozenset({"child", "home_address"})
)
EXAMPLES["AddressChangedDelivery"] = _by_top_level_field(
    EXAMPLES["AddressChanged"], frozenset({"person", "new_address", "effective_date", "nino"})
)
# The same by field path: a partner's name without their NINO, no informant.
EXAMPLES["DeathRegisteredDisclosure"] = minimise(
    "DeathRegistered",
    EXAMPLES["DeathRegistered"],
    frozenset({"deceased", "date_of_death", "last_address", "surviving_partner.person"}),
)
EXAMPLES["BirthRegisteredDisclosure"] = minimise(
    "BirthRegistered", EXAMPLES["BirthRegistered"], frozenset({"child", "home_address", "parents.person"})
)
EXAMPLES["AddressChangedDisclosure"] = minimise(
    "AddressChanged",
    EXAMPLES["AddressChanged"],
    frozenset({"person", "new_address", "effective_date", "nino", "moving_with.person"}),
)
# The Passport Office's copy: the person and the passport number, not the licence.
EXAMPLES["ServicesRequestedDisclosure"] = minimise(
    "ServicesRequested",
    EXAMPLES["ServicesRequested"],
    frozenset({"person", "date_of_death", "passport_number"}),
)
EXAMPLES["EventCorrectedDisclosure"] = {
    **EXAMPLES["EventCorrected"],
    "envelope": minimise_envelope(EXAMPLES["EventCorrected"]["envelope"], frozenset()),
    "withheld_fields": [],
}
EXAMPLES["EventVoidedDisclosure"] = {
    **EXAMPLES["EventVoided"],
    "envelope": minimise_envelope(EXAMPLES["EventVoided"]["envelope"], frozenset()),
    "withheld_fields": [],
}


def write_missing(entries: list[CatalogueEntry]) -> list[str]:
    written = []
    for entry in entries:
        stem = f"{entry.name}.v{entry.version}"
        if (HERE / f"{stem}.bin").exists():
            continue
        record = EXAMPLES[entry.name]
        buffer = io.BytesIO()
        buffer.write(struct.pack(">bI", 0, entry.schema_id))
        schemaless_writer(buffer, entry.parsed, record)
        (HERE / f"{stem}.bin").write_bytes(buffer.getvalue())
        written_back = schemaless_reader(io.BytesIO(buffer.getvalue()[5:]), entry.parsed, None)
        (HERE / f"{stem}.json").write_text(
            json.dumps(jsonable(written_back), indent=2, sort_keys=True) + "\n"
        )
        written.append(stem)
    return written


if __name__ == "__main__":
    print(write_missing(CATALOGUE.entries()))
