"""`tuo schemas check|freeze`: versions stay FULL_TRANSITIVE compatible, and an
incompatible change fails naming the schema and the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from operators.cli import app
from schemas.catalogue import NAMESPACE, SOURCE_DIR, TOP_LEVEL, VERSIONS_DIR, SchemaCatalogue
from schemas.codec import decode, encode
from tests.schemas.test_codec import _death


@pytest.fixture
def contract(tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the schema sources and released versions to change."""
    source, versions = tmp_path / "avro", tmp_path / "versions"
    shutil.copytree(SOURCE_DIR, source)
    shutil.copytree(VERSIONS_DIR, versions)
    return source, versions


def _tuo(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})
    return result.exit_code, result.output


COMMITTED = SchemaCatalogue(VERSIONS_DIR)


def _next(name: str) -> str:
    """The version a change to ``name`` would release: ``DeathRegistered v3``."""
    return f"{name} v{COMMITTED.latest(name).version + 1}"


def _edit_source(source: Path, name: str, change: Any) -> None:
    path = source / f"{NAMESPACE}.{name}.avsc"
    schema = json.loads(path.read_text())
    change(schema)
    path.write_text(json.dumps(schema, indent=2))


def test_committed_contract_passes_the_check() -> None:
    code, output = _tuo("schemas", "check")
    assert code == 0, output
    assert f"{len(TOP_LEVEL)} schemas" in output and "FULL_TRANSITIVE compatible" in output


def test_field_added_without_a_default_fails_naming_schema_and_field(contract: tuple[Path, Path]) -> None:
    source, versions = contract
    before = (versions / "catalogue.json").read_text()
    _edit_source(source, "DeathRegistered", lambda s: s["fields"].append({"name": "cause", "type": "string"}))
    code, output = _tuo("schemas", "freeze", "--source-dir", str(source), "--versions-dir", str(versions))
    assert code == 1
    assert (
        f"{_next('DeathRegistered')} cannot read data written with v1: field 'cause': "
        "not in the data written and has no default" in output
    )
    assert "Nothing released" in output
    assert (versions / "catalogue.json").read_text() == before, "a refused release burns no id"
    code, output = _tuo("schemas", "check", "--source-dir", str(source), "--versions-dir", str(versions))
    assert code == 1 and "differs from its latest release" in output


def test_nested_field_change_names_the_path_to_the_field(contract: tuple[Path, Path]) -> None:
    source, versions = contract
    _edit_source(source, "Address", lambda s: s["fields"].append({"name": "county", "type": "string"}))
    code, output = _tuo("schemas", "freeze", "--source-dir", str(source), "--versions-dir", str(versions))
    assert code == 1
    death, birth = _next("DeathRegistered"), _next("BirthRegistered")
    assert f"{death} cannot read data written with v1: field 'last_address.county'" in output
    assert "field 'surviving_partner.address.county'" in output, "through a nullable union"
    assert f"{birth} cannot read data written with v1: field 'parents[].address.county'" in output


def test_changed_logical_type_is_refused(contract: tuple[Path, Path]) -> None:
    source, versions = contract

    def to_millis(schema: dict[str, Any]) -> None:
        schema["fields"][3]["type"] = {"type": "long", "logicalType": "timestamp-millis"}

    _edit_source(source, "Envelope", to_millis)
    code, output = _tuo("schemas", "freeze", "--source-dir", str(source), "--versions-dir", str(versions))
    assert code == 1
    assert "field 'envelope.recorded_at': logical type timestamp-micros became timestamp-millis" in output


def test_field_removed_without_a_default_fails_for_old_readers(contract: tuple[Path, Path]) -> None:
    source, versions = contract
    _edit_source(source, "DeliveryReceipt", lambda s: s["fields"].pop(1))  # drops "agency"
    code, output = _tuo("schemas", "freeze", "--source-dir", str(source), "--versions-dir", str(versions))
    assert code == 1
    assert "DeliveryReceipt v1 cannot read data written with v3: field 'agency'" in output
    assert "DeliveryReceipt v3 cannot" not in output, "new readers ignore the removed field"


def test_field_added_with_a_default_is_released_and_old_data_still_decodes(
    contract: tuple[Path, Path],
) -> None:
    source, versions = contract
    released = SchemaCatalogue(versions)
    next_id = max(e.schema_id for e in released.entries()) + 1
    version = released.latest("DeathRegistered").version + 1
    old_bytes = encode("DeathRegistered", _death(), released)
    _edit_source(
        source,
        "DeathRegistered",
        lambda s: s["fields"].append({"name": "coroner_case", "type": ["null", "string"], "default": None}),
    )
    code, output = _tuo("schemas", "freeze", "--source-dir", str(source), "--versions-dir", str(versions))
    assert code == 0, output
    assert f"released DeathRegistered v{version} (id {next_id})" in output
    assert f"released DeathRegisteredDisclosure v{version} (id {next_id + 1})" in output, (
        "the agency form follows its event"
    )
    assert "DeathRegisteredDelivery" not in output, "a superseded form is not released again"
    evolved = SchemaCatalogue(versions)
    assert [e.version for e in evolved.versions("DeathRegistered")][-2:] == [version - 1, version]
    assert evolved.version("DeathRegistered", 1).schema_id == 2, "released ids never change"
    name, record = decode(old_bytes, evolved)
    assert name == "DeathRegistered"
    assert record["coroner_case"] is None, "v1 data read with the new schema gets the default"
    new_bytes = encode("DeathRegistered", {**_death(), "coroner_case": "LS-2026-1"}, evolved)
    assert int.from_bytes(new_bytes[1:5], "big") == evolved.latest("DeathRegistered").schema_id == next_id


def test_enum_without_a_default_symbol_is_refused(contract: tuple[Path, Path]) -> None:
    source, versions = contract

    def drop_default(schema: dict[str, Any]) -> None:
        schema["fields"][2]["type"].pop("default")

    _edit_source(source, "DeliveryReceipt", drop_default)
    code, output = _tuo("schemas", "freeze", "--source-dir", str(source), "--versions-dir", str(versions))
    assert code == 1
    assert "enum uk.gov.tellusonce.ReceiptOutcome at .outcome has no default symbol" in output


def test_source_changed_without_a_release_is_caught(contract: tuple[Path, Path]) -> None:
    source, versions = contract
    _edit_source(source, "EventVoided", lambda s: s.update(doc="reworded"))
    code, output = _tuo("schemas", "check", "--source-dir", str(source), "--versions-dir", str(versions))
    assert code == 1
    assert "EventVoided in" in output and "run `tuo schemas freeze`" in output


def test_schema_ids_are_the_committed_ones() -> None:
    """Ids come from the catalogue file, not from start-up order: the same everywhere, for ever."""
    manifest = json.loads((VERSIONS_DIR / "catalogue.json").read_text())
    ids = {(i["name"], i["version"]): i["id"] for i in manifest["schemas"]}
    assert ids[("BirthRegistered", 1)] == 1
    assert ids[("DeathRegistered", 1)] == 2
    assert ids[("AddressChanged", 1)] == 3
    assert len(set(ids.values())) == len(ids)
