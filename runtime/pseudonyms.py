"""Pseudonymous subject ids: the key every message about one person carries, so that
their events stay in order without naming them."""

from __future__ import annotations

import hashlib
import hmac
import uuid


def subject_id_for(person_nino: str | None, key: bytes) -> str:
    """Pseudonymous subject id: keyed hash of the NINO, or random when unknown."""
    if person_nino is None:
        return f"s-{uuid.uuid4().hex}"
    digest = hmac.new(key, person_nino.encode(), hashlib.sha256).hexdigest()
    return f"n-{digest[:32]}"
