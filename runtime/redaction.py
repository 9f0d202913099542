"""Keep personal data and secrets out of the logs.

Two layers, applied to every log line (see ``runtime.logging``):

* **By key.** A value under a key that names personal data (names, NINO, address,
  address lines, postcode, UPRN, date of birth, contact details) or a secret
  (password, token, API key, authorization, cookie, database URL, private or
  signing key…) becomes ``[redacted]``, at any depth of dicts, lists and tuples.
  The key stays, so a reader sees that something was there. Keys match whatever
  their case or spelling (``familyName``, ``FAMILY-NAME``, ``deceased_family_name``).
* **By pattern.** Every string, the event message and formatted tracebacks
  included, is scrubbed of UK National Insurance numbers (with or without spaces),
  full UK postcodes (with or without the space, any case), calendar dates
  (``YYYY-MM-DD`` that is not the date part of a timestamp, and ``DD/MM/YYYY``),
  the password in URL credentials (``scheme://user:***@host``), ``password=...``
  style secrets, bearer tokens, and the input that pydantic echoes back in a
  validation error (``input_value=...``).

What no pattern can find: a name, a street or a town in free text looks like any
other word. Those stay out of the logs only because the code never puts them
there: log event ids, references, agencies and counts, and if personal data must
ever travel with a log call, pass it under a key this module knows. For the same
reason raw bytes (message payloads: Avro writes strings as plain UTF-8) are
replaced by their length.

Event ids (UUIDs), references (``TUO-2026-ABCD-EFGH``), pseudonymous subject ids,
timestamps, agency names and numbers pass unchanged.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import re
from collections.abc import Callable, Mapping
from datetime import date, datetime, time
from typing import Any
from uuid import UUID

from pydantic import BaseModel
from structlog.processors import format_exc_info
from structlog.typing import EventDict, WrappedLogger

REDACTED = "[redacted]"

# Keys matched whole or as the last part of a longer key (``deceased_family_name``).
_SENSITIVE_WORDS = (
    # names
    "given_name", "given_names", "first_name", "first_names", "middle_name", "middle_names",
    "last_name", "family_name", "surname", "full_name", "forename", "forenames",
    "maiden_name", "birth_name", "previous_name", "previous_names",
    # national insurance number
    "nino", "national_insurance_number", "ni_number",
    # addresses and contact details
    "address", "addresses", "address_line", "address_lines", "street",
    "postcode", "post_code", "postal_code", "uprn", "place_of_birth", "place_of_death",
    "email", "phone", "phone_number", "telephone", "mobile_number",
    # identifiers that spell out a name or lead straight to a person
    "driver_number", "licence_number", "passport_number",
    # dates of birth
    "date_of_birth", "birth_date", "birthdate", "dob",
    # secrets
    "password", "passwd", "secret", "token", "api_key", "apikey", "authorization",
    "cookie", "cookies", "set_cookie", "database_url", "dsn", "private_key", "signing_key",
    "secret_key", "pseudonym_key", "credentials", "session_id",
)  # fmt: skip
# Too general to match as the end of a longer key (``agency_name``, ``session_count``).
_SENSITIVE_WHOLE_KEYS = frozenset({"name", "names", "maiden", "auth", "pwd", "session", "town"})
_SENSITIVE_KEYS = frozenset(_SENSITIVE_WORDS) | _SENSITIVE_WHOLE_KEYS
_SENSITIVE_SUFFIXES = tuple("_" + word for word in _SENSITIVE_WORDS)
_ADDRESS_LINE_KEY = re.compile(r"(?:address_?)?line_?\d+|address_?\d+")
_CAMEL_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")

_FREE_TEXT = re.compile(
    r"""
    (?P<url>(?P<url_keep>\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)[^\s@/]+(?=@))
    | (?P<assignment>
        (?P<assignment_keep>\b[\w-]*?(?:password|passwd|secret|token|api_?key)['"]?\s*[=:]\s*['"]?)
        [^\s'",;&)}\]]+)
    | (?P<bearer>(?P<bearer_keep>\bbearer\s+)[\w.~+/=-]{8,})
    | (?P<echo>(?P<echo_keep>\binput_value=).*?(?=,\s*input_type=))
    | (?P<nino>(?<![a-z0-9])[a-z]{2}\s?\d{2}\s?\d{2}\s?\d{2}\s?[a-d](?![a-z0-9]))
    | (?P<postcode>(?<![a-z0-9])[a-z]{1,2}\d[a-z\d]?\s?\d[a-z]{2}(?![a-z0-9]))
    | (?P<iso_date>
        (?<![\d.:-])\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])
        (?![\d:]|[T\x20]\d{1,2}:))  # the date part of a timestamp is not a date of birth
    | (?P<dmy_date>
        (?<![\d/.-])(?:0?[1-9]|[12]\d|3[01])(?P<separator>[/.-])(?:0?[1-9]|1[0-2])
        (?P=separator)\d{4}(?![\d/.-]))
    """,
    re.IGNORECASE | re.VERBOSE,
)
_REPLACEMENTS = {
    "nino": "[redacted nino]",
    "postcode": "[redacted postcode]",
    "iso_date": "[redacted date]",
    "dmy_date": "[redacted date]",
}
_MAX_DEPTH = 12


def redact_personal_data(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: redact personal data and secrets by key and by pattern.

    Runs after ``format_exc_info``; an ``exc_info`` still unformatted is formatted
    here first, so that no traceback reaches the renderer unscrubbed."""
    if "exc_info" in event_dict:
        event_dict = format_exc_info(logger, method_name, event_dict)
    for key, value in event_dict.items():
        event_dict[key] = _redact_entry(key, value, 0)
    return event_dict


@functools.lru_cache(maxsize=4096)  # log calls use few distinct keys, over and over
def is_sensitive_key(key: str) -> bool:
    """Whether a value under ``key`` is personal data or a secret, whatever the key's spelling."""
    normal = _CAMEL_HUMP.sub("_", key.strip()).lower().replace("-", "_").replace(" ", "_")
    return (
        normal in _SENSITIVE_KEYS
        or normal.endswith(_SENSITIVE_SUFFIXES)
        or _ADDRESS_LINE_KEY.fullmatch(normal) is not None
    )


def scrub(text: str) -> str:
    """``text`` with NINOs, postcodes, dates and credentials replaced."""
    if len(text) < 5:  # shorter than the shortest thing to find
        return text
    return _FREE_TEXT.sub(_replacement, text)


def _replacement(match: re.Match[str]) -> str:
    kind = match.lastgroup or ""
    keep = match.groupdict().get(kind + "_keep")
    if keep is not None:
        return keep + ("***" if kind != "echo" else REDACTED)
    return _REPLACEMENTS[kind]


def _redact_entry(key: object, value: object, depth: int) -> object:
    if isinstance(key, str) and value is not None and is_sensitive_key(key):
        return REDACTED
    return _redact_value(value, depth)


def _redact_value(value: object, depth: int) -> object:
    if isinstance(value, str):
        return scrub(value)
    if value is None or isinstance(value, bool | int | float | UUID | datetime | time | enum.Enum):
        return value
    if depth >= _MAX_DEPTH:  # deeper than any log call needs; perhaps a cycle
        return REDACTED
    if isinstance(value, date):  # a calendar date, not a timestamp: perhaps a date of birth
        return _REPLACEMENTS["iso_date"]
    if isinstance(value, Mapping):
        return {
            scrub(k) if isinstance(k, str) else k: _redact_entry(k, v, depth + 1) for k, v in value.items()
        }
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        # (name, value) pairs, as in Kafka and HTTP headers
        return (scrub(value[0]), _redact_entry(value[0], value[1], depth + 1))
    if isinstance(value, list | tuple | set | frozenset):
        items = [_redact_value(item, depth + 1) for item in value]
        # Sets as lists: what they hold may no longer be hashable, and JSON has no sets.
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, bytes | bytearray | memoryview):
        return f"[redacted {len(value)} bytes]"
    if isinstance(value, BaseModel):
        return _redact_value(value.model_dump(mode="json"), depth + 1)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return _redact_value(fields, depth + 1)
    # What the JSON renderer would write for it anyway, scrubbed.
    return scrub(repr(value))


class RedactingLogRecordFactory:
    """A standard-library log record factory that scrubs every record as it is made.

    Libraries log through the standard library (aiokafka, asyncpg, uvicorn), and
    uvicorn attaches handlers of its own, so the scrubbing is done where every
    record is born rather than in one handler. The message is formatted with its
    arguments and scrubbed; a traceback or stack is formatted and scrubbed too."""

    def __init__(self, make_record: Callable[..., logging.LogRecord]) -> None:
        self.make_record = make_record

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.make_record(*args, **kwargs)
        redact_record(record)
        return record


_TRACEBACKS = logging.Formatter()


def redact_record(record: logging.LogRecord) -> None:
    """Scrub a standard-library log record in place (see ``scrub``)."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad log call must not fail its caller; keep what it said
        message = f"{record.msg!r} with arguments {record.args!r}"
    record.msg = scrub(message)
    record.args = ()
    if record.exc_info and not record.exc_text:
        record.exc_text = scrub(_TRACEBACKS.formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = scrub(record.stack_info)
