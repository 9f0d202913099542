"""Mechanical schema-evolution checks: every version of every schema is
FULL_TRANSITIVE compatible with all its earlier versions, enums that will grow
have a default symbol, and nobody changed a schema without releasing a version.

Compatibility is judged by the Apache ``avro`` package (an implementation
independent of the fastavro codec), in both directions: a reader on any version
reads data written with any other.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType
from avro.schema import parse

from schemas.catalogue import (
    SOURCE_DIR,
    TOP_LEVEL,
    VERSIONS_DIR,
    CatalogueEntry,
    SchemaCatalogue,
    UnknownSchema,
    expand_source,
)


def _field_names(schema: dict[str, Any], location: str) -> str:
    """Turn an avro location like /fields/3/type/fields/1 into field names."""
    names: list[str] = []
    node: Any = schema
    parts = [p for p in location.split("/") if p]
    i = 0
    while i < len(parts) and isinstance(node, (dict, list)):
        part = parts[i]
        if isinstance(node, dict) and part == "fields" and i + 1 < len(parts) and parts[i + 1].isdigit():
            fields = node.get("fields", [])
            index = int(parts[i + 1])
            if index >= len(fields):
                break
            node = fields[index]
            names.append(node["name"])
            i += 2
            continue
        if isinstance(node, dict):
            node = node.get(part)
        elif part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        i += 1
    return ".".join(names) or "(whole record)"


def _incompatibilities(reader: CatalogueEntry, writer: CatalogueEntry) -> Iterator[str]:
    result = ReaderWriterCompatibilityChecker().get_compatibility(  # type: ignore[no-untyped-call]
        parse(reader.schema_json), parse(writer.schema_json)
    )
    if result.compatibility is SchemaCompatibilityType.compatible:
        return
    kinds = ", ".join(sorted(k.value for k in result.incompatibilities))
    for location in sorted(result.locations) or ["/"]:
        field = _field_names(reader.schema, location)
        yield (
            f"{reader.name} v{reader.version} cannot read data written with v{writer.version}: "
            f"field {field!r} ({kinds}; at {location})"
        )


def _enums_without_default(schema: Any, path: str = "") -> Iterator[str]:
    if isinstance(schema, dict):
        if schema.get("type") == "enum" and "default" not in schema:
            yield f"enum {schema.get('name')} at {path or '/'} has no default symbol"
        for key, value in schema.items():
            if key == "fields" and isinstance(value, list):
                for field in value:
                    yield from _enums_without_default(field.get("type"), f"{path}.{field.get('name')}")
            elif key in ("type", "items", "values"):
                yield from _enums_without_default(value, path)
    elif isinstance(schema, list):
        for branch in schema:
            yield from _enums_without_default(branch, path)


def check(source_dir: Path = SOURCE_DIR, versions_dir: Path = VERSIONS_DIR) -> list[str]:
    """Every problem found, each naming the schema and field; empty when all is well."""
    problems: list[str] = []
    catalogue = SchemaCatalogue(versions_dir)
    for name in TOP_LEVEL:
        try:
            versions = catalogue.versions(name)
        except UnknownSchema:
            problems.append(f"{name} has no released version: run `tuo schemas freeze`")
            continue
        numbers = [e.version for e in versions]
        if numbers != list(range(1, len(numbers) + 1)):
            problems.append(f"{name} versions are {numbers}; they must run 1, 2, 3, … without gaps")
        if json.loads(json.dumps(expand_source(name, source_dir))) != versions[-1].schema:
            problems.append(
                f"{name} in {source_dir} differs from its latest release v{versions[-1].version}: "
                "run `tuo schemas freeze` to release it as a new version"
            )
        for entry in versions:
            problems += [f"{name} v{entry.version}: {p}" for p in _enums_without_default(entry.schema)]
        for newer_index, newer in enumerate(versions):
            for older in versions[:newer_index]:
                problems += _incompatibilities(newer, older)  # new readers, old data
                problems += _incompatibilities(older, newer)  # old readers, new data
    return problems
