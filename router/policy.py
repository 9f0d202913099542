"""Sensitive-domain blocks: policy written in code, not configuration, so that no
subscription row can ever open these routes. Changing them is a code change
with review, not an operator's command."""

from __future__ import annotations

from router.rules import PolicyBlock

POLICY: tuple[PolicyBlock, ...] = (
    PolicyBlock(
        event_types=frozenset({"BirthRegistered"}),
        agencies=frozenset({"home-office-ie"}),
        reason="birth registrations are never shared with immigration enforcement",
    ),
)
