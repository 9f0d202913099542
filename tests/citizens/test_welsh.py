"""The informant's journey in Welsh: every message its pages can show has a Welsh
translation in citizens/locale (found the way gettext's tools find them: ``_()`` and
``N_()`` in the templates and the modules whose words the pages show), and the pages
over real HTTP, against the real PostgreSQL and the running bus, speak Welsh when asked."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from datetime import date
from pathlib import Path

import asyncpg
import httpx
import pytest
from babel.messages.extract import extract_from_file

from citizens.emails import address_problem
from runtime.settings import Settings
from runtime.web import i18n
from runtime.web.i18n import language, long_date, translated
from schemas.identity_documents import driving_licence_problem, passport_problem
from tests.citizen_browser import Stack, browser, serve_citizens
from tests.citizens.test_informant_journey import (
    BORN,
    WRONG_BORN,
    error_links,
    install_with_intake,
    registered,
    text_of,
)

ROOT = Path(__file__).resolve().parents[2]
KEYWORDS = {"_": None, "gettext": None, "N_": None}
TEMPLATES = [
    *sorted((ROOT / "citizens/templates").glob("informant_*.html")),
    ROOT / "runtime/web/templates/layout.html",
]
MODULES = [
    ROOT / path
    for path in (
        "citizens/informants.py",
        "citizens/data_tracker.py",
        "citizens/emails.py",
        "router/organisations.py",
        "router/registrations.py",
        "runtime/web/pages.py",
    )
]


def messages() -> Iterator[tuple[str, str]]:
    """Every message marked for translation in the journey's templates and modules, with where."""
    for template in TEMPLATES:
        for line, message, _comments, _context in extract_from_file(
            "jinja2", template, keywords=KEYWORDS, options={"extensions": "jinja2.ext.i18n"}
        ):
            assert isinstance(message, str)  # no plural forms in the journey
            yield message, f"{template.name}:{line}"
    for module in MODULES:
        for line, message, _comments, _context in extract_from_file("python", module, keywords=KEYWORDS):
            assert isinstance(message, str)
            yield message, f"{module.relative_to(ROOT)}:{line}"


def problems_the_checks_give() -> set[str]:
    """The messages the document and address checks give (in modules below the web's
    layer, so not marked there): each produced by a wrong answer."""
    born = date(1941, 3, 2)
    found = {
        driving_licence_problem("X", "Example", born),
        driving_licence_problem("SMITH403021PJ9AB", "Example", born),
        driving_licence_problem("EXAMP403031PJ9AB", "Example", born),
        passport_problem("X"),
        address_problem("not an address"),
    }
    return {problem for problem in found if problem}


def test_every_message_the_informant_can_see_has_welsh() -> None:
    found = dict(messages())
    assert len(found) > 150, "the extraction found the journey's messages"
    untranslated = sorted(
        f"{where}: {message!r}" for message, where in found.items() if not translated(message)
    )
    untranslated += sorted(repr(m) for m in problems_the_checks_give() if not translated(m))
    assert untranslated == []


def test_a_welsh_message_keeps_every_placeholder_of_the_english() -> None:
    language.set("cy")
    try:
        for message, where in messages():
            placeholders = sorted(re.findall(r"%\(\w+\)s", message))
            assert sorted(re.findall(r"%\(\w+\)s", i18n.gettext(message))) == placeholders, where
    finally:
        language.set("en")


def test_dates_are_written_in_the_language_of_the_page() -> None:
    token = language.set("cy")
    try:
        assert long_date(date(2026, 3, 27)) == "27 Mawrth 2026"
    finally:
        language.reset(token)
    assert long_date(date(2026, 3, 27)) == "27 March 2026"


# The pages over real HTTP.


@pytest.fixture(scope="module")
async def stack(services: Settings, pool: asyncpg.Pool) -> AsyncIterator[Stack]:
    async with serve_citizens(services, pool, install_with_intake) as (base_url, idp, settings):
        yield Stack(base_url, idp, settings)


@pytest.mark.integration
async def test_the_journey_speaks_welsh_when_asked_and_remembers_it(
    stack: Stack, intake: httpx.AsyncClient
) -> None:
    reference = await registered(intake)
    async with browser() as client:
        start = await client.get(f"{stack.base_url}/tell-us-once?lang=cy")
        assert start.status_code == 200
        assert '<html lang="cy"' in start.text
        words = text_of(start.text)
        assert "Dweud Wrthym Unwaith" in words and "Dechrau nawr" in words and "Start now" not in words
        assert 'href="?lang=en"' in start.text, "a way back to English on every page"
        assert client.cookies.get("tuo-lang") == "cy"

        # Remembered without asking again: the question page and its errors are in Welsh.
        wrong = await client.post(
            f"{stack.base_url}/tell-us-once/reference", data={"reference": reference, **WRONG_BORN}
        )
        assert wrong.status_code == 400 and '<html lang="cy"' in wrong.text
        assert "Mae problem wedi codi" in text_of(wrong.text)
        assert error_links(wrong.text) == {
            "reference": "Nid yw’r cyfeirnod na’r dyddiad geni yn gywir:"
            " gwiriwch y ddau yn erbyn llythyr y cofrestrydd"
        }
        opened = await client.post(
            f"{stack.base_url}/tell-us-once/reference", data={"reference": reference, **BORN}
        )
        assert opened.status_code == 303
        page = text_of((await client.get(f"{stack.base_url}/tell-us-once/registration")).text)
        assert "Y farwolaeth a gofrestrwyd gennych" in page
        assert "Swyddfa Pasbort EF" in page and "Pwy all gael gwybod os ydych yn cytuno" in page
        month = (
            "Ionawr",
            "Chwefror",
            "Mawrth",
            "Ebrill",
            "Mai",
            "Mehefin",
            "Gorffennaf",
            "Awst",
            "Medi",
            "Hydref",
            "Tachwedd",
            "Rhagfyr",
        )
        assert re.search(rf"tan \d{{1,2}} ({'|'.join(month)}) \d{{4}}", page), "the date in Welsh"

        # And back to English.
        english = await client.get(f"{stack.base_url}/tell-us-once/registration?lang=en")
        assert '<html lang="en"' in english.text and "The death you registered" in english.text
        assert client.cookies.get("tuo-lang") == "en"


@pytest.mark.integration
async def test_an_unknown_language_or_a_malformed_cookie_gets_english(stack: Stack) -> None:
    async with browser() as client:
        for headers, url in (
            ({}, "/tell-us-once?lang=xx"),
            ({"Cookie": 'tuo-lang="cy; broken'}, "/tell-us-once"),
            ({"Cookie": "tuo-lang=" + "c" * 10_000}, "/tell-us-once"),
        ):
            page = await client.get(f"{stack.base_url}{url}", headers=headers)
            assert page.status_code == 200 and '<html lang="en"' in page.text and "Start now" in page.text
            assert "tuo-lang" not in page.headers.get("set-cookie", "")
