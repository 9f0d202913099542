"""Golden vectors: messages encoded with each released schema version, committed,
which must keep decoding to the same records for ever."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from fastavro import schemaless_reader

from schemas.catalogue import CATALOGUE, CatalogueEntry
from schemas.codec import decode, encode
from tests.golden.jsonable import jsonable

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def _stem(entry: CatalogueEntry) -> str:
    return f"{entry.name}.v{entry.version}"


def _vector(entry: CatalogueEntry) -> tuple[bytes, dict[str, object]]:
    binary = GOLDEN / f"{_stem(entry)}.bin"
    assert binary.exists(), f"run `python -m tests.golden.make_vectors` for {_stem(entry)}"
    return binary.read_bytes(), json.loads((GOLDEN / f"{_stem(entry)}.json").read_text())


@pytest.mark.parametrize("entry", CATALOGUE.entries(), ids=_stem)
def test_every_released_version_has_a_golden_vector_that_still_decodes(entry: CatalogueEntry) -> None:
    value, expected = _vector(entry)
    assert int.from_bytes(value[1:5], "big") == entry.schema_id, "the vector carries its version's id"
    exact = schemaless_reader(io.BytesIO(value[5:]), entry.parsed, None)
    assert jsonable(exact) == expected, "decoded with its own version: the very record written"
    name, latest = decode(value)  # through the codec, resolved to the latest version
    assert name == entry.name
    assert _as_written(jsonable(latest), expected) == expected


def _as_written(latest: object, expected: object) -> object:
    """``latest`` without the fields later versions added (at any depth, such as an
    address's local_authority), which a reader fills with their defaults."""
    if isinstance(latest, dict) and isinstance(expected, dict):
        return {k: _as_written(v, expected[k]) for k, v in latest.items() if k in expected}
    if isinstance(latest, list) and isinstance(expected, list) and len(latest) == len(expected):
        return [_as_written(v, e) for v, e in zip(latest, expected, strict=True)]
    return latest


@pytest.mark.parametrize("entry", [CATALOGUE.latest(n) for n in CATALOGUE.names()], ids=_stem)
def test_latest_version_still_encodes_the_vector_byte_for_byte(entry: CatalogueEntry) -> None:
    """Our codec and the committed bytes agree, so agencies' decoders see no change."""
    value, _ = _vector(entry)
    _, record = decode(value)
    assert encode(entry.name, record) == value
