"""Mechanical schema-evolution checks: every version of every schema is
FULL_TRANSITIVE compatible with all its earlier versions, enums that will grow
have a default symbol, and nobody changed a schema without releasing a version.

Compatibility is judged by the Apache ``avro`` package (an implementation
independent of the fastavro codec), in both directions: a reader on any version
reads data written with any other.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType
from avro.schema import ArraySchema, MapSchema, RecordSchema, Schema, UnionSchema, parse

from schemas.catalogue import (
    CURRENT,
    SOURCE_DIR,
    TOP_LEVEL,
    VERSIONS_DIR,
    CatalogueEntry,
    SchemaCatalogue,
    UnknownSchema,
    expand_source,
    write_new_versions,
)

_CHECKER = ReaderWriterCompatibilityChecker()  # type: ignore[no-untyped-call]
_CONTAINERS = ("record", "array", "map", "union")  # walked even when compatible: logical types


def _type_key(schema: Schema) -> str:
    """What identifies a union branch: a named type's full name, else its type."""
    return str(getattr(schema, "fullname", None) or schema.type)


def _explain(reader: Schema, writer: Schema, path: str) -> list[str]:
    """Why ``reader`` cannot read ``writer``, as the deepest fields that break it.

    avro's checker says whether a pair is compatible; its own locations restart at
    every union, so we walk records, arrays, maps and unions ourselves to name the
    field, asking the checker again at each level.
    """
    problems: list[str] = []
    reader_logical, writer_logical = reader.get_prop("logicalType"), writer.get_prop("logicalType")
    if reader_logical != writer_logical:
        return [f"{path or '(record)'}: logical type {writer_logical} became {reader_logical}"]
    result = _CHECKER.get_compatibility(reader, writer)
    if result.compatibility is SchemaCompatibilityType.compatible and reader.type not in _CONTAINERS:
        return []
    if isinstance(reader, RecordSchema) and isinstance(writer, RecordSchema):
        written = {f.name: f for f in writer.fields}
        for field in reader.fields:
            where = f"{path}.{field.name}" if path else field.name
            if field.name not in written:
                if not field.has_default:
                    problems.append(f"{where}: not in the data written and has no default")
                continue
            problems += _explain(field.type, written[field.name].type, where)
    elif isinstance(reader, ArraySchema) and isinstance(writer, ArraySchema):
        problems += _explain(reader.items, writer.items, f"{path}[]")
    elif isinstance(reader, MapSchema) and isinstance(writer, MapSchema):
        problems += _explain(reader.values, writer.values, f"{path}{{}}")
    elif isinstance(writer, UnionSchema) or isinstance(reader, UnionSchema):
        readers = reader.schemas if isinstance(reader, UnionSchema) else [reader]
        writers = writer.schemas if isinstance(writer, UnionSchema) else [writer]
        by_key = {_type_key(r): r for r in readers}
        for branch in writers:
            match = by_key.get(_type_key(branch))
            if match is None:
                problems.append(f"{path}: a {_type_key(branch)} value can no longer be read")
            else:
                problems += _explain(match, branch, path)
    if not problems and result.compatibility is not SchemaCompatibilityType.compatible:
        kinds = ", ".join(sorted(k.value for k in result.incompatibilities))
        problems.append(f"{path or '(record)'}: {kinds}")
    return problems


def _incompatibilities(reader: CatalogueEntry, writer: CatalogueEntry) -> Iterator[str]:
    for problem in _explain(parse(reader.schema_json), parse(writer.schema_json), ""):
        field, _, why = problem.partition(": ")
        yield (
            f"{reader.name} v{reader.version} cannot read data written with v{writer.version}: "
            f"field {field!r}: {why}"
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
        superseded = name not in CURRENT  # kept readable, never released again
        if not superseded and json.loads(json.dumps(expand_source(name, source_dir))) != versions[-1].schema:
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


@dataclass(frozen=True)
class Release:
    released: list[str]  # "Name vN (id I)" for each new version
    problems: list[str]  # why nothing was released


def release(source_dir: Path = SOURCE_DIR, versions_dir: Path = VERSIONS_DIR) -> Release:
    """Release changed schemas as new versions, only if the result passes ``check``.

    The new versions are tried in a scratch copy first, so an incompatible change
    writes nothing and burns no schema id.
    """
    with tempfile.TemporaryDirectory() as scratch:
        trial = Path(scratch) / "versions"
        shutil.copytree(versions_dir, trial)
        released = write_new_versions(source_dir, trial)
        problems = check(source_dir, trial)
        if problems:
            return Release([], problems)
        if released:
            shutil.copytree(trial, versions_dir, dirs_exist_ok=True)
    return Release(released, [])
