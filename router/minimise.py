"""Data minimisation: cut an event down to the fields one agency may receive.

The envelope always travels (it says what happened, when, and who told us), but
its NINO only when the subscription names ``nino``. Every other field the
agency is not entitled to becomes null and is listed in ``withheld_fields``.
"""

from __future__ import annotations

from typing import Any

NINO = "nino"  # pseudo-field: the envelope's subject NINO


def event_fields(record: dict[str, Any]) -> frozenset[str]:
    """The fields a subscription can grant: the event's own fields and ``nino``."""
    return frozenset(name for name in record if name != "envelope") | {NINO}


def minimise(record: dict[str, Any], delivered: frozenset[str]) -> dict[str, Any]:
    envelope = dict(record["envelope"])
    if NINO not in delivered:
        envelope["subject"] = {**envelope["subject"], "nino": None}
    minimised: dict[str, Any] = {"envelope": envelope}
    for name, value in record.items():
        if name != "envelope":
            minimised[name] = value if name in delivered else None
    minimised["withheld_fields"] = sorted(event_fields(record) - delivered)
    return minimised
