"""Pages in English or Welsh: GOV.UK services used in Wales must be bilingual.

Each part of the service that speaks Welsh keeps its catalogue as a gettext ``.po``
file (``<part>/locale/cy/LC_MESSAGES/messages.po``), read with Babel when the part is
added (``add_catalogue``): English is the source language, the ``msgid``. The language
of the request being served is a context variable, set by ``LanguageChoice`` from
``?lang=cy`` (which it remembers in a cookie) or that cookie; templates say ``_()`` and
Python says ``gettext()`` (as ``_``), and both read it. A message with no Welsh shows in
English, and the test ``tests/citizens/test_welsh.py`` fails for it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from datetime import date
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs

from babel.dates import format_date
from babel.messages.pofile import read_po

Language = Literal["en", "cy"]
LANGUAGES: tuple[Language, ...] = ("en", "cy")
COOKIE = "tuo-lang"
language: ContextVar[Language] = ContextVar("language", default="en")
_catalogues: dict[Language, dict[str, str]] = {"en": {}, "cy": {}}


def add_catalogue(folder: Path) -> None:
    """Read the Welsh messages of one part of the service (``folder``/cy/LC_MESSAGES)."""
    with (folder / "cy" / "LC_MESSAGES" / "messages.po").open("rb") as po:
        catalogue = read_po(po, locale="cy")
    _catalogues["cy"].update(
        {
            m.id: m.string
            for m in catalogue
            if isinstance(m.id, str) and m.id and isinstance(m.string, str) and m.string and not m.fuzzy
        }
    )


def N_(message: str) -> str:
    """Mark ``message`` for translation where it is defined (a constant); it is translated
    where it is shown, with ``gettext``."""
    return message


def gettext(message: str) -> str:
    """``message`` in the language of the request being served (English if untranslated)."""
    return _catalogues[language.get()].get(message, message)


def ngettext(singular: str, plural: str, n: int) -> str:
    # Welsh has six plural forms; the pages avoid counted nouns, so one form per number here.
    return gettext(singular if n == 1 else plural)


def translated(message: str) -> bool:
    return message in _catalogues["cy"]


def long_date(day: date) -> str:
    """A date as GOV.UK writes it, in the request's language: 27 March 2026, 27 Mawrth 2026."""
    return format_date(day, "d MMMM y", locale=language.get())


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class LanguageChoice:
    """For paths under ``prefix``: the language the visitor chose (``?lang=``, kept a
    year in a cookie that holds nothing else), as the request's ``language``."""

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        asked = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("lang", [""])[-1]
        cookies = SimpleCookie()
        for name, value in scope.get("headers", ()):
            if name == b"cookie":
                try:
                    cookies.load(value.decode("latin-1"))
                except CookieError:  # a malformed Cookie header: no preference
                    cookies = SimpleCookie()
        kept = cookies[COOKIE].value if COOKIE in cookies else ""
        chosen: Language = "cy" if (asked or kept) == "cy" else "en"
        token = language.set(chosen)

        async def remembering(message: Message) -> None:
            if message["type"] == "http.response.start" and asked in LANGUAGES:
                cookie = f"{COOKIE}={asked}; Path=/; Max-Age=31536000; SameSite=Lax; HttpOnly"
                message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie.encode())]
            await send(message)

        try:
            await self.app(scope, receive, remembering)
        finally:
            language.reset(token)
