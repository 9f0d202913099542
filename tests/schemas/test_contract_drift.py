"""The pydantic contract models and the .avsc files must not drift: this walks
every latest schema and its model side by side, field by field."""

from __future__ import annotations

import types
from datetime import date, datetime
from typing import Any, Literal, Union, get_args, get_origin
from uuid import UUID

import pytest
from pydantic import BaseModel

from schemas.catalogue import (
    CATALOGUE,
    DELIVERIES,
    DISCLOSURE_SUFFIX,
    DISCLOSURES,
    TOP_LEVEL,
    disclosure_schema,
)
from schemas.models import TOP_LEVEL_MODELS

PRIMITIVES: dict[str, type] = {"string": str, "int": int, "long": int, "boolean": bool, "double": float}
LOGICAL: dict[str, type] = {"uuid": UUID, "date": date, "timestamp-micros": datetime}


def _strip(annotation: Any) -> Any:
    """Annotated[X, ...] → X (pydantic keeps metadata on field info, not the annotation)."""
    while get_origin(annotation) is not None and getattr(annotation, "__metadata__", None) is not None:
        annotation = get_args(annotation)[0]
    return annotation


def _compare(avro: Any, annotation: Any, path: str, named: dict[str, Any]) -> list[str]:
    annotation = _strip(annotation)
    if isinstance(avro, str) and avro in named:
        avro = named[avro]
    if isinstance(avro, list):  # a union: we only use ["null", X]
        if len(avro) != 2 or avro[0] != "null":
            return [f"{path}: unsupported union {avro}"]
        args = [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) not in (Union, types.UnionType) or len(args) != 1:
            return [f"{path}: Avro is nullable but the model is {annotation}"]
        return _compare(avro[1], args[0], path, named)
    if isinstance(avro, str):
        expected = PRIMITIVES.get(avro)
        return [] if annotation is expected else [f"{path}: Avro {avro} but model {annotation}"]
    kind = avro["type"]
    if "logicalType" in avro:
        expected = LOGICAL[avro["logicalType"]]
        return (
            [] if annotation is expected else [f"{path}: Avro {avro['logicalType']} but model {annotation}"]
        )
    if kind == "array":
        if get_origin(annotation) is not list:
            return [f"{path}: Avro array but model {annotation}"]
        return _compare(avro["items"], get_args(annotation)[0], f"{path}[]", named)
    if kind == "enum":
        if get_origin(annotation) is not Literal:
            return [f"{path}: Avro enum but model {annotation}"]
        if list(get_args(annotation)) != avro["symbols"]:
            return [f"{path}: enum symbols {avro['symbols']} but model {list(get_args(annotation))}"]
        return []
    if kind == "record":
        named[avro["name"]] = avro
        named[avro["name"].rsplit(".", 1)[-1]] = avro
        return _compare_record(avro, annotation, path, named)
    if isinstance(kind, (dict, list)) or kind in named:
        return _compare(kind, annotation, path, named)
    return _compare(kind, annotation, path, named)


def _compare_record(avro: dict[str, Any], model: Any, path: str, named: dict[str, Any]) -> list[str]:
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return [f"{path}: Avro record {avro['name']} but model {model}"]
    problems = []
    if model.__name__ != avro["name"].rsplit(".", 1)[-1]:
        problems.append(f"{path}: record {avro['name']} but model {model.__name__}")
    avro_fields = [f["name"] for f in avro["fields"]]
    model_fields = list(model.model_fields)
    if avro_fields != model_fields:
        return [*problems, f"{path or model.__name__}: fields {avro_fields} but model has {model_fields}"]
    for field in avro["fields"]:
        info = model.model_fields[field["name"]]
        where = f"{path}.{field['name']}" if path else field["name"]
        if ("default" in field) == info.is_required():
            problems.append(
                f"{where}: Avro default {'present' if 'default' in field else 'absent'}, "
                f"model {'required' if info.is_required() else 'optional'}"
            )
        problems += _compare(field["type"], info.annotation, where, named)
    return problems


@pytest.mark.parametrize("name", sorted(TOP_LEVEL_MODELS))
def test_model_agrees_with_the_latest_schema_field_by_field(name: str) -> None:
    assert _compare_record(CATALOGUE.latest(name).schema, TOP_LEVEL_MODELS[name], "", {}) == []


def test_every_hand_written_schema_has_a_model_and_disclosures_are_derived() -> None:
    assert set(TOP_LEVEL) - set(TOP_LEVEL_MODELS) == set(DELIVERIES) | set(DISCLOSURES)
    for name in DISCLOSURES:
        base = CATALOGUE.latest(name.removesuffix(DISCLOSURE_SUFFIX)).schema
        assert CATALOGUE.latest(name).schema == disclosure_schema(base), f"{name} drifted from its event"


def test_drift_is_detected() -> None:
    """The comparison itself can fail: a schema with a renamed field does not match."""
    schema = CATALOGUE.latest("DeliveryReceipt").schema
    renamed = {**schema, "fields": [{**schema["fields"][0], "name": "eventId"}, *schema["fields"][1:]]}
    problems = _compare_record(renamed, TOP_LEVEL_MODELS["DeliveryReceipt"], "", {})
    assert problems and "eventId" in problems[0]
    nullable = {
        **schema,
        "fields": [*schema["fields"][:3], {**schema["fields"][3], "type": "string"}, schema["fields"][4]],
    }
    assert any("reason" in p for p in _compare_record(nullable, TOP_LEVEL_MODELS["DeliveryReceipt"], "", {}))
