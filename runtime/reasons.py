"""The reasons and names people give for what they do (a redrive, a subscription change, a
look at someone's records), checked one way: kept with the record, and often shown to
others, so plain text on one line, of a sensible length."""

from __future__ import annotations

REASON_LENGTH = (3, 500)
NAME_LENGTH = (1, 200)


class NotPlainWords(ValueError):
    """A reason or a name that cannot be kept as given; the message says why."""


def checked_reason(reason: str) -> str:
    reason = reason.strip()
    low, high = REASON_LENGTH
    if not low <= len(reason) <= high:
        raise NotPlainWords(f"give a reason of {low} to {high} characters (yours has {len(reason)})")
    if not reason.isprintable():
        raise NotPlainWords("the reason has control characters; write it on one line of plain text")
    return reason


def checked_name(name: str) -> str:
    name = name.strip()
    low, high = NAME_LENGTH
    if not low <= len(name) <= high or not name.isprintable():
        raise NotPlainWords(f"a name is {low} to {high} printable characters")
    return name
