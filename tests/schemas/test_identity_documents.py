"""The checks on the document numbers an informant gives (pure logic, no services)."""

from __future__ import annotations

from datetime import date

import pytest

from consumers.agencies.records import driver_number_for
from schemas import models
from schemas.identity_documents import driving_licence_problem, passport_problem, surname_code
from schemas.validation import as_printed

BORN = date(1941, 3, 2)


@pytest.mark.parametrize(
    ("family_name", "code"),
    [("Example", "EXAMP"), ("Li", "LI999"), ("MacDonald", "MCDON"), ("O'Neill-Smith", "ONEIL")],
)
def test_a_licence_number_begins_with_the_surname_as_dvla_writes_it(family_name: str, code: str) -> None:
    assert surname_code(family_name) == code


def test_a_licence_number_matching_the_surname_and_date_of_birth_is_accepted_for_a_man_or_a_woman() -> None:
    assert driving_licence_problem(as_printed(" examp 403021 pj9ab "), "Example", BORN) is None
    assert driving_licence_problem("EXAMP453021PJ9AB", "Example", BORN) is None  # a woman's month + 50
    # The reference agency's own numbers pass the same check.
    holder = models.Person(given_names="Pat Jo", family_name="MacDonald", date_of_birth=BORN)
    assert driving_licence_problem(driver_number_for(holder), "MacDonald", BORN) is None


@pytest.mark.parametrize(
    ("number", "complaint"),
    [
        ("EXAMP403021PJ9A", "16 letters and numbers"),
        ("EXAMP403021PJ9AB7", "16 letters and numbers"),
        ("<script>alert(1)</script>", "16 letters and numbers"),
        ("SMITH403021PJ9AB", "does not match the surname"),
        ("EXAMP403031PJ9AB", "does not match the date of birth"),
        ("EXAMP413021PJ9AB", "does not match the date of birth"),
    ],
)
def test_a_licence_number_not_shaped_as_dvla_issues_or_of_someone_else_is_refused(
    number: str, complaint: str
) -> None:
    problem = driving_licence_problem(number, "Example", BORN)
    assert problem is not None and complaint in problem


@pytest.mark.parametrize(
    ("number", "accepted"), [("123456789", True), ("12345678", False), ("12345678X", False)]
)
def test_a_passport_number_is_nine_digits(number: str, accepted: bool) -> None:
    assert (passport_problem(number) is None) is accepted
