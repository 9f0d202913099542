"""Redaction of personal data and secrets in log lines, rule by rule, without a broker."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from runtime.logging import configured_logging
from runtime.redaction import REDACTED, redact_personal_data, scrub
from runtime.settings import Settings
from schemas import models


def redacted(**event: Any) -> dict[str, Any]:
    return dict(redact_personal_data(None, "info", {"event": "something_happened", **event}))


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def test_values_under_personal_data_keys_are_redacted_at_any_depth_and_the_keys_kept() -> None:
    line = redacted(
        deceased={
            "given_names": "Pat",
            "family_name": "Example",
            "date_of_birth": "1941-03-02",
            "nino": "AB123456C",
        },
        informant=[{"name": "Alex Example", "relationship": "daughter"}],
        last_address=("1 Example Street", "Leeds"),
        home={"line1": "1 Example Street", "address_line_2": "Flat 2", "postcode": "LS1 1AA", "uprn": "1"},
        surname="Example",
        dob="02/03/1941",
    )
    assert line["deceased"] == dict.fromkeys(
        ("given_names", "family_name", "date_of_birth", "nino"), REDACTED
    )
    assert line["informant"] == [{"name": REDACTED, "relationship": "daughter"}]
    assert line["last_address"] == REDACTED
    assert line["home"] == dict.fromkeys(("line1", "address_line_2", "postcode", "uprn"), REDACTED)
    assert (line["surname"], line["dob"]) == (REDACTED, REDACTED)


@pytest.mark.parametrize(
    "key",
    [
        "givenNames",
        "FAMILY-NAME",
        "Date Of Birth",
        "deceased_family_name",
        "first_name",
        "full_name",
        "maiden_name",
        "maiden",
        "national_insurance_number",
        "NINO",
        "address_lines",
        "birth_date",
        "partner_dob",
    ],
)
def test_personal_data_keys_match_whatever_their_case_or_spelling(key: str) -> None:
    assert redacted(**{key: "Pat"})[key] == REDACTED


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "sasl_password",
        "secret",
        "client_secret",
        "token",
        "registrar_token",
        "api_key",
        "Authorization",
        "cookie",
        "database_url",
        "dsn",
        "private_key",
        "signing_key",
        "pseudonym_key",
    ],
)
def test_values_under_secret_keys_are_redacted(key: str) -> None:
    line = redacted(request={"headers": {key: "s3cr3t-value"}})
    assert line["request"]["headers"][key] == REDACTED


def test_headers_as_name_value_pairs_are_redacted_by_name() -> None:
    line = redacted(headers=[("Authorization", "Bearer abc"), ("ce_type", "DeathRegistered")])
    assert line["headers"] == [("Authorization", REDACTED), ("ce_type", "DeathRegistered")]


def test_keys_that_only_resemble_personal_data_keep_their_values() -> None:
    kept = {
        "agency_name": "dwp",
        "postcode_areas": ["ZE1"],
        "token_count": 3,
        "session_count": 2,
        "lines": 12,
        "component": "router",
    }
    assert redacted(**kept) == {"event": "something_happened", **kept}


def test_personal_data_that_is_absent_is_shown_as_absent() -> None:
    assert redacted(nino=None)["nino"] is None


@pytest.mark.parametrize("nino", ["AB123456C", "AB 12 34 56 C", "ab123456c", "CE 123456 A"])
def test_a_nino_in_the_message_is_scrubbed_with_or_without_spaces(nino: str) -> None:
    line = redacted(event=f"no match for {nino} at dwp", detail=f"nino={nino}")
    assert line["event"] == "no match for [redacted nino] at dwp"
    assert line["detail"] == "nino=[redacted nino]"


@pytest.mark.parametrize(
    "postcode", ["LS1 1AA", "LS11AA", "ls1 1aa", "SW1A 2AA", "sw1a2aa", "M1 1AE", "B33 8TH"]
)
def test_a_full_postcode_in_free_text_is_scrubbed_with_or_without_the_space_in_any_case(
    postcode: str,
) -> None:
    assert scrub(f"household at {postcode}, Leeds") == "household at [redacted postcode], Leeds"


@pytest.mark.parametrize("when", ["1941-03-02", "02/03/1941", "2/3/1941", "02-03-1941", "02.03.1941"])
def test_a_calendar_date_in_free_text_is_scrubbed(when: str) -> None:
    assert scrub(f"born {when}; died yesterday") == "born [redacted date]; died yesterday"


@pytest.mark.parametrize(
    "timestamp", ["2026-05-01T12:34:56.789012Z", "2026-05-01T12:34:56+01:00", "2026-05-01 12:34:56"]
)
def test_a_timestamp_is_not_taken_for_a_date(timestamp: str) -> None:
    assert scrub(f"decided at {timestamp}") == f"decided at {timestamp}"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://tuo:hunter2@127.0.0.1:5432/tuo", "postgresql://tuo:***@127.0.0.1:5432/tuo"),
        ("https://registry:pa%24%24@schemas.example:8081", "https://registry:***@schemas.example:8081"),
        ("redis://:hunter2@cache", "redis://:***@cache"),
    ],
)
def test_a_password_in_url_credentials_is_scrubbed_and_the_user_kept(url: str, shown: str) -> None:
    assert scrub(f"cannot connect to {url}: refused") == f"cannot connect to {shown}: refused"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("sasl_plain_password='hunter2' rejected", "sasl_plain_password='***' rejected"),
        ("password=hunter2&user=tuo", "password=***&user=tuo"),
        ("{'api_key': 'abc123'}", "{'api_key': '***'}"),
        ("Authorization: Bearer eyJhbGciOi.payload.sig", "Authorization: Bearer ***"),
    ],
)
def test_secrets_written_out_in_free_text_are_scrubbed(text: str, shown: str) -> None:
    assert scrub(text) == shown


def test_a_validation_error_does_not_echo_what_was_submitted() -> None:
    message = "given_names\n  String too long [type=string_too_long, input_value='Patricia', input_type=str]"
    assert scrub(message) == (
        "given_names\n  String too long [type=string_too_long, input_value=[redacted], input_type=str]"
    )


def test_an_exception_is_scrubbed_whether_formatted_before_or_by_the_processor() -> None:
    try:
        raise LookupError("no tax record for AB123456C at LS1 1AA, born 1941-03-02")
    except LookupError as exc:
        error = exc
    unformatted = redacted(exc_info=error)
    formatted = redact_personal_data(
        None, "error", structlog.processors.format_exc_info(None, "error", {"event": "x", "exc_info": error})
    )
    for line in (unformatted, formatted):
        assert "exc_info" not in line
        assert "LookupError: no tax record for [redacted nino] at [redacted postcode]" in line["exception"]
        assert "AB123456C" not in line["exception"] and "1941-03-02" not in line["exception"]


def test_event_ids_references_timestamps_agencies_and_counts_pass_unchanged() -> None:
    event_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    kept: dict[str, Any] = {
        "event": "event_handled",
        "event_id": event_id,
        "event_uuid": uuid.UUID(event_id),
        "reference": "TUO-2026-AB3C-D4EF",
        "subject": "n-" + uuid.uuid4().hex,
        "timestamp": now.isoformat(),
        "decided_at": now,
        "agency": "council-leeds",
        "delivered": ["dvla", "dwp", "hmrc"],
        "topic": "tuo.agency.council-leeds",
        "partition": 2,
        "offset": 1_234_567,
        "duplicate": False,
        "level": "info",
        "host": "127.0.0.1",
        "port": 8080,
        "url": "http://127.0.0.1:8080/v1/death-registrations",
    }
    assert redact_personal_data(None, "info", dict(kept)) == kept


def test_payloads_calendar_dates_and_records_are_redacted_as_well_as_strings() -> None:
    @dataclass
    class Found:
        family_name: str
        agency: str

    person = models.Person(given_names="Pat", family_name="Example", date_of_birth=date(1941, 3, 2))
    line = redacted(
        value=b"\x02\x06Pat\x0eExample", born=date(1941, 3, 2), person=person, found=Found("E", "dwp")
    )
    assert line["value"] == "[redacted 13 bytes]"
    assert line["born"] == "[redacted date]"
    assert line["person"]["given_names"] == REDACTED and line["person"]["date_of_birth"] == REDACTED
    assert line["found"] == {"family_name": REDACTED, "agency": "dwp"}


def test_the_callers_objects_are_left_as_they_were() -> None:
    deceased = {"family_name": "Example", "lines": ["born 1941-03-02"]}
    redacted(deceased=deceased)
    assert deceased == {"family_name": "Example", "lines": ["born 1941-03-02"]}


def test_configured_logging_writes_scrubbed_json_lines(tmp_path: Path) -> None:
    log_file = tmp_path / "tuo.log"
    with configured_logging(Settings(log_level="INFO", log_format="json"), log_file):
        log = structlog.get_logger("tests.redaction")
        log.info("death_recorded for AB 12 34 56 C", family_name="Example", reference="TUO-2026-ABCD-EFGH")
        try:
            raise ValueError("postcode LS1 1AA does not match")
        except ValueError:
            log.exception("lookup_failed", dsn="postgresql://tuo:hunter2@db/tuo")
    accepted, failed = json_lines(log_file)
    assert accepted["event"] == "death_recorded for [redacted nino]"
    assert accepted["family_name"] == REDACTED and accepted["reference"] == "TUO-2026-ABCD-EFGH"
    assert accepted["timestamp"].startswith(str(datetime.now(UTC).year)), accepted["timestamp"]
    assert failed["dsn"] == REDACTED
    assert "ValueError: postcode [redacted postcode] does not match" in failed["exception"]
    assert "hunter2" not in log_file.read_text()


def test_standard_library_records_are_scrubbed_whichever_handler_writes_them(tmp_path: Path) -> None:
    log_file = tmp_path / "tuo.log"
    # uvicorn's loggers write through handlers of their own and do not propagate.
    own = logging.getLogger("tests.redaction.own-handler")
    own_file = tmp_path / "own.log"
    own_handler = logging.FileHandler(own_file)
    own.addHandler(own_handler)
    own.propagate = False
    try:
        with configured_logging(Settings(), log_file):
            for logger in (logging.getLogger("aiokafka.tests"), own):
                logger.warning("connect %s failed for %s", "postgresql://tuo:hunter2@db/tuo", "AB123456C")
                try:
                    raise KeyError("LS1 1AA")
                except KeyError:
                    logger.exception("lookup failed for %(nino)s", {"nino": "AB123456C"})
                logger.warning("unformattable %s %s", "1941-03-02")  # must not raise
    finally:
        own.removeHandler(own_handler)
        own_handler.close()
    for written in (log_file.read_text(), own_file.read_text()):
        assert "connect postgresql://tuo:***@db/tuo failed for [redacted nino]" in written
        assert "lookup failed for [redacted nino]" in written
        assert "KeyError: '[redacted postcode]'" in written
        assert "unformattable" in written
        for secret in ("hunter2", "AB123456C", "LS1 1AA", "1941-03-02"):
            assert secret not in written


def test_logging_is_as_it_was_after_a_configured_block(tmp_path: Path) -> None:
    root = logging.getLogger()
    before = (structlog.get_config(), root.level, list(root.handlers), logging.getLogRecordFactory())
    with configured_logging(Settings(log_level="DEBUG"), tmp_path / "tuo.log"):
        assert [type(h) for h in root.handlers] == [logging.FileHandler]
    assert (structlog.get_config(), root.level, list(root.handlers), logging.getLogRecordFactory()) == before


def test_towns_and_places_of_birth_and_death_are_redacted() -> None:
    event = {
        "event": "example",
        "last": {"town": "Leeds", "postcode_area": "LS"},
        "place_of_death": "Leeds General Infirmary",
        "child_place_of_birth": "St James's",
        "agency": "dwp",
    }
    redacted = redact_personal_data(None, "info", dict(event))
    assert redacted["last"]["town"] == REDACTED
    assert redacted["place_of_death"] == REDACTED and redacted["child_place_of_birth"] == REDACTED
    assert redacted["agency"] == "dwp"
