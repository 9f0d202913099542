"""The schema catalogue: every released version of every schema, with its wire id.

``schemas/avro/`` holds the schemas as people edit them (named types in their
own files, the single source of truth). ``schemas/versions/`` holds each
released version frozen as one self-contained schema, and ``catalogue.json``
there gives each (name, version) its schema id. Ids are committed, so they are
the same on every machine and after every restart; an id, once given, is never
changed or reused. ``tuo schemas freeze`` adds a version when a source changed;
``tuo schemas check`` proves the versions compatible (see ``schemas.evolution``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from fastavro import parse_schema
from fastavro.schema import load_schema, to_parsing_canonical_form

NAMESPACE = "uk.gov.tellusonce"
SOURCE_DIR = Path(__file__).parent / "avro"
VERSIONS_DIR = Path(__file__).parent / "versions"
CATALOGUE_FILE = "catalogue.json"

# The top-level schemas: one per event type, plus the bus's own messages.
LIFE_EVENTS = (
    "BirthRegistered",
    "DeathRegistered",
    "AddressChanged",
    "EventCorrected",
    "EventVoided",
    "ServicesRequested",
)
BUS_MESSAGES = ("DeliveryReceipt", "RoutingDecision", "ConsentChanged")
# The event types agencies subscribe to, each cut down per agency to what it is granted;
# the follow-ups (corrections, voids) go to whoever received what they follow.
MINIMISED = ("BirthRegistered", "DeathRegistered", "AddressChanged", "ServicesRequested")
# Superseded by the disclosures: agencies' copies minimised by top-level field only,
# derived mechanically from the event's schema (``delivery_schema``).
# Still released (messages written with them must stay readable), no longer written.
DELIVERY_SUFFIX = "Delivery"
DELIVERIES = tuple(
    f"{name}{DELIVERY_SUFFIX}" for name in ("BirthRegistered", "DeathRegistered", "AddressChanged")
)
# What an agency receives of any life event, minimised by field path (see
# ``schemas.fieldpaths``); derived mechanically from the event's schema.
DISCLOSURE_SUFFIX = "Disclosure"
DISCLOSURES = tuple(f"{name}{DISCLOSURE_SUFFIX}" for name in LIFE_EVENTS)
CURRENT = LIFE_EVENTS + BUS_MESSAGES + DISCLOSURES  # released anew when their sources change
TOP_LEVEL = CURRENT + DELIVERIES
DISCLOSURE_NAMESPACE = f"{NAMESPACE}.disclosure"  # named types whose shape differs in a disclosure


class UnknownSchema(LookupError):
    """No schema with this id, name or version is in the catalogue."""


def delivery_schema(event_schema: dict[str, Any]) -> dict[str, Any]:
    """The schema of what one agency receives of an event: the envelope, then every
    other field made optional (null when the agency's subscription does not cover
    it), then ``withheld_fields`` naming what was left out."""
    derived = copy.deepcopy(event_schema)
    base_name = derived["name"].rsplit(".", 1)[-1]
    derived["name"] = f"{derived['name']}{DELIVERY_SUFFIX}"
    derived["doc"] = (
        f"What one agency receives of a {base_name}: only the fields its subscription covers; "
        "the others are null and named in withheld_fields."
    )
    for field in derived["fields"]:
        if field["name"] != "envelope":
            _nullable(field)
    derived["fields"].append(
        {
            "name": "withheld_fields",
            "type": {"type": "array", "items": "string"},
            "default": [],
            "doc": "Fields of the event this agency is not entitled to; 'nino' means the envelope's NINO.",
        }
    )
    return derived


def _nullable(field: dict[str, Any]) -> None:
    kind = field["type"]
    if not (isinstance(kind, list) and kind and kind[0] == "null"):
        field["type"] = ["null", *kind] if isinstance(kind, list) else ["null", kind]
    field["default"] = None


# The members that may be withheld inside a named type: the envelope's personal
# fields, and the parts of a related person (see ``schemas.fieldpaths``).
_WITHHOLDABLE = {
    f"{NAMESPACE}.Informant": ("name", "relationship"),
    f"{NAMESPACE}.Provenance": ("recorded_by",),
    f"{NAMESPACE}.RelatedPerson": ("person", "relationship"),
}
_CONTAINING = (f"{NAMESPACE}.Envelope",)  # renamed too: they hold a renamed type


def disclosure_schema(event_schema: dict[str, Any]) -> dict[str, Any]:
    """The schema of what one agency receives of an event: the envelope with its
    personal fields optional, every other field optional, a related person's every
    part optional, and ``withheld_fields`` naming the paths left out. Named types
    whose shape changes move to the ``disclosure`` namespace, so no two schemas give
    one full name two shapes."""
    derived = copy.deepcopy(event_schema)
    base_name = derived["name"].rsplit(".", 1)[-1]
    follow_up = base_name not in MINIMISED
    derived["name"] = f"{derived['name']}{DISCLOSURE_SUFFIX}"
    derived["doc"] = (
        f"What one agency receives of a {base_name}: only the field paths its subscription grants; "
        "the others are null and named in withheld_fields."
    )
    renamed = {
        name: f"{DISCLOSURE_NAMESPACE}.{name.rsplit('.', 1)[-1]}" for name in (*_WITHHOLDABLE, *_CONTAINING)
    }

    def walk(schema: Any) -> Any:
        if isinstance(schema, str):
            return renamed.get(schema, schema)
        if isinstance(schema, list):
            return [walk(branch) for branch in schema]
        if isinstance(schema, dict):
            name = schema.get("name")
            for field in schema.get("fields", ()):
                field["type"] = walk(field["type"])
                if field["name"] in _WITHHOLDABLE.get(name or "", ()):
                    _nullable(field)
            if schema.get("type") == "array":
                schema["items"] = walk(schema["items"])
            if name in renamed:
                schema["name"] = renamed[name]
        return schema

    for field in derived["fields"]:
        field["type"] = walk(field["type"])
        if field["name"] != "envelope" and not follow_up:
            _nullable(field)
    derived["fields"].append(
        {
            "name": "withheld_fields",
            "type": {"type": "array", "items": "string"},
            "default": [],
            "doc": "Field paths of the event this agency is not entitled to (see schemas/fieldpaths.py).",
        }
    )
    return derived


def expand_source(name: str, source_dir: Path = SOURCE_DIR) -> dict[str, Any]:
    """The named schema from the source files, with every named type it uses inlined."""
    if name in DISCLOSURES:
        return disclosure_schema(expand_source(name.removesuffix(DISCLOSURE_SUFFIX), source_dir))
    if name in DELIVERIES:
        return delivery_schema(expand_source(name.removesuffix(DELIVERY_SUFFIX), source_dir))
    expanded = load_schema(str(source_dir / f"{NAMESPACE}.{name}.avsc"), _write_hint=False)
    assert isinstance(expanded, dict)
    return expanded


def canonical_form(schema: Any) -> str:
    """Avro's Parsing Canonical Form: equal for schemas that read and write alike,
    whatever their documentation, key order or namespace spelling."""
    return str(to_parsing_canonical_form(parse_schema(schema, _write_hint=False)))


@dataclass(frozen=True)
class CatalogueEntry:
    schema_id: int
    name: str  # the record's short name, which is also the event type
    version: int
    schema: dict[str, Any]

    @property
    def subject(self) -> str:
        """The registry subject: the record's full name (RecordNameStrategy)."""
        return f"{NAMESPACE}.{self.name}"

    @cached_property
    def schema_json(self) -> str:
        return json.dumps(self.schema, separators=(",", ":"))

    @cached_property
    def canonical_form(self) -> str:
        return canonical_form(self.schema)

    @cached_property
    def parsed(self) -> Any:
        return parse_schema(self.schema)  # with the hint, fastavro does not re-parse per call


class SchemaCatalogue:
    def __init__(self, versions_dir: Path = VERSIONS_DIR) -> None:
        self.versions_dir = versions_dir
        manifest = json.loads((versions_dir / CATALOGUE_FILE).read_text())
        self._by_id: dict[int, CatalogueEntry] = {}
        self._versions: dict[str, list[CatalogueEntry]] = {}
        for item in manifest["schemas"]:
            entry = CatalogueEntry(
                schema_id=item["id"],
                name=item["name"],
                version=item["version"],
                schema=json.loads((versions_dir / item["file"]).read_text()),
            )
            if entry.schema_id in self._by_id:
                raise ValueError(f"schema id {entry.schema_id} is used twice in {CATALOGUE_FILE}")
            self._by_id[entry.schema_id] = entry
            self._versions.setdefault(entry.name, []).append(entry)
        for versions in self._versions.values():
            versions.sort(key=lambda e: e.version)

    def by_id(self, schema_id: int) -> CatalogueEntry:
        try:
            return self._by_id[schema_id]
        except KeyError:
            raise UnknownSchema(f"no schema with id {schema_id} in the catalogue") from None

    def latest(self, name: str) -> CatalogueEntry:
        return self.versions(name)[-1]

    def versions(self, name: str) -> list[CatalogueEntry]:
        found = self._versions.get(name.removeprefix(f"{NAMESPACE}."))
        if not found:
            raise UnknownSchema(f"no schema named {name!r} in the catalogue")
        return found

    def version(self, name: str, version: int) -> CatalogueEntry:
        for entry in self.versions(name):
            if entry.version == version:
                return entry
        raise UnknownSchema(f"{name} has no version {version}")

    def with_ids(self, ids: dict[tuple[str, int], int]) -> SchemaCatalogue:
        """The same schemas under other ids (those an external registry gave them).

        Encoding uses the new ids. The committed ids stay readable as aliases where
        the registry did not hand the same number to another schema, so messages
        already on the topics still decode after a switch to an external registry.
        """
        copy = SchemaCatalogue.__new__(SchemaCatalogue)
        copy.versions_dir = self.versions_dir
        copy._by_id = {}
        copy._versions = {}
        for entry in self.entries():
            moved = CatalogueEntry(ids[(entry.name, entry.version)], entry.name, entry.version, entry.schema)
            if moved.schema_id in copy._by_id:
                raise ValueError(f"the registry gave id {moved.schema_id} to two schemas")
            copy._by_id[moved.schema_id] = moved
            copy._versions.setdefault(moved.name, []).append(moved)
        for entry in self.entries():
            if entry.schema_id not in copy._by_id:
                copy._by_id[entry.schema_id] = copy.version(entry.name, entry.version)
        return copy

    def names(self) -> list[str]:
        return sorted(self._versions)

    def entries(self) -> list[CatalogueEntry]:
        """Every version once, by id (aliases left out)."""
        unique = {(e.name, e.version): e for e in self._by_id.values() if self._by_id.get(e.schema_id) is e}
        return sorted(unique.values(), key=lambda e: e.schema_id)


def write_new_versions(source_dir: Path, versions_dir: Path) -> list[str]:
    """Write a new version of every top-level schema whose source changed, judging
    nothing (``schemas.evolution.release`` checks first). Returns "Name vN (id I)"."""
    manifest_path = versions_dir / CATALOGUE_FILE
    manifest: dict[str, Any] = (
        json.loads(manifest_path.read_text()) if manifest_path.exists() else {"schemas": []}
    )
    manifest.setdefault(
        "doc", "Schema ids for the Confluent wire format. An id, once given, is never changed or reused."
    )
    written = []
    next_id = max((item["id"] for item in manifest["schemas"]), default=0) + 1
    for name in CURRENT:
        current = expand_source(name, source_dir)
        released = sorted(
            (item for item in manifest["schemas"] if item["name"] == name), key=lambda i: i["version"]
        )
        if released and json.loads((versions_dir / released[-1]["file"]).read_text()) == current:
            continue
        version = released[-1]["version"] + 1 if released else 1
        file = f"{NAMESPACE}.{name}.v{version}.avsc"
        (versions_dir / file).write_text(json.dumps(current, indent=2) + "\n")
        manifest["schemas"].append({"id": next_id, "name": name, "version": version, "file": file})
        written.append(f"{name} v{version} (id {next_id})")
        next_id += 1
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return written


CATALOGUE = SchemaCatalogue()
_active = CATALOGUE


def active() -> SchemaCatalogue:
    """The catalogue this process encodes and decodes with: the committed one, or
    the same schemas under an external registry's ids (see ``schemas.registry_client``)."""
    return _active


def activate(catalogue: SchemaCatalogue) -> None:
    global _active
    _active = catalogue
