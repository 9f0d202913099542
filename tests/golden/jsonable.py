"""Turn decoded Avro records into plain JSON values for comparison."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any
from uuid import UUID


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    return value
