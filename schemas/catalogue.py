"""The schema catalogue: subject, version and wire id of every ``.avsc`` file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastavro.schema import load_schema

AVRO_DIR = Path(__file__).parent / "avro"


class UnknownSchema(LookupError):
    """No schema with this id or subject is in the catalogue."""


@dataclass(frozen=True)
class CatalogueEntry:
    schema_id: int
    subject: str
    version: int
    parsed: Any  # fastavro's parsed schema, named types expanded


class SchemaCatalogue:
    def __init__(self, directory: Path = AVRO_DIR) -> None:
        manifest = json.loads((directory / "catalogue.json").read_text())
        self._by_id: dict[int, CatalogueEntry] = {}
        self._latest: dict[str, CatalogueEntry] = {}
        for item in manifest["schemas"]:
            entry = CatalogueEntry(
                schema_id=item["id"],
                subject=item["subject"],
                version=item["version"],
                parsed=load_schema(str(directory / item["file"])),
            )
            if entry.schema_id in self._by_id:
                raise ValueError(f"schema id {entry.schema_id} is used twice in the catalogue")
            self._by_id[entry.schema_id] = entry
            current = self._latest.get(entry.subject)
            if current is None or current.version < entry.version:
                self._latest[entry.subject] = entry

    def by_id(self, schema_id: int) -> CatalogueEntry:
        try:
            return self._by_id[schema_id]
        except KeyError:
            raise UnknownSchema(f"no schema with id {schema_id} in the catalogue") from None

    def latest(self, subject: str) -> CatalogueEntry:
        try:
            return self._latest[subject]
        except KeyError:
            raise UnknownSchema(f"no schema for subject {subject!r} in the catalogue") from None

    def subjects(self) -> list[str]:
        return sorted(self._latest)


CATALOGUE = SchemaCatalogue()
