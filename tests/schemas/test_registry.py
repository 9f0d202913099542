"""The Confluent Schema Registry API served from the catalogue, and binding the
bus to an external Confluent-compatible registry."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from schemas.catalogue import CATALOGUE
from schemas.codec import decode, encode
from schemas.registry_client import RegistryRefused, bind_to_registry
from tests.schemas.test_codec import _death

REGISTRY_MEDIA = "application/vnd.schemaregistry.v1+json"
DEATH = "uk.gov.tellusonce.DeathRegistered"


@pytest.mark.integration
async def test_schema_by_id_is_the_writer_schema_of_the_message(intake: httpx.AsyncClient) -> None:
    value = encode("DeathRegistered", _death())
    schema_id = int.from_bytes(value[1:5], "big")
    response = await intake.get(f"/schemas/ids/{schema_id}")
    assert response.status_code == 200
    assert response.headers["content-type"] == REGISTRY_MEDIA
    schema = json.loads(response.json()["schema"])
    assert schema["name"] == DEATH
    assert [f["name"] for f in schema["fields"]][:3] == ["envelope", "deceased", "date_of_death"]


@pytest.mark.integration
async def test_subjects_versions_and_latest_are_listed(intake: httpx.AsyncClient) -> None:
    subjects = (await intake.get("/subjects")).json()
    assert DEATH in subjects and "uk.gov.tellusonce.ConsentChanged" in subjects
    assert len(subjects) == len(CATALOGUE.names()), "every schema in the catalogue is a subject"
    latest = CATALOGUE.latest("DeathRegistered")
    assert (await intake.get(f"/subjects/{DEATH}/versions")).json() == list(range(1, latest.version + 1))
    first = (await intake.get(f"/subjects/{DEATH}/versions/1")).json()
    assert (first["subject"], first["version"], first["id"]) == (DEATH, 1, 2), "released ids never change"
    assert json.loads(first["schema"]) == CATALOGUE.version("DeathRegistered", 1).schema
    for version in ("latest", "-1"):
        body = (await intake.get(f"/subjects/{DEATH}/versions/{version}")).json()
        assert (body["subject"], body["version"], body["id"]) == (DEATH, latest.version, latest.schema_id)
        assert json.loads(body["schema"]) == latest.schema
    raw = (await intake.get(f"/subjects/{DEATH}/versions/1/schema")).json()
    assert raw["name"] == DEATH


@pytest.mark.integration
@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/schemas/ids/999", 404, 40403),
        ("/schemas/ids/0", 404, 40403),
        ("/subjects/uk.gov.tellusonce.MarriageRegistered/versions", 404, 40401),
        (f"/subjects/{DEATH}/versions/7", 404, 40402),
        (f"/subjects/{DEATH}/versions/abc", 422, 42202),
        (f"/subjects/{DEATH}/versions/0", 422, 42202),
    ],
)
async def test_unknown_or_hostile_lookups_get_the_registrys_error_codes(
    intake: httpx.AsyncClient, path: str, status: int, code: int
) -> None:
    response = await intake.get(path)
    assert response.status_code == status
    assert response.json()["error_code"] == code
    assert response.json()["message"]


@pytest.mark.integration
@pytest.mark.parametrize(
    "path",
    ["/schemas/ids/abc", "/schemas/ids/99999999999999999999999", "/schemas/ids/%C2%B2", "/schemas/ids/-1"],
)
async def test_malformed_schema_ids_get_the_registrys_not_found(intake: httpx.AsyncClient, path: str) -> None:
    response = await intake.get(path)
    assert response.status_code == 404
    assert response.json()["error_code"] == 40403


@pytest.mark.integration
@pytest.mark.parametrize("version", ["%C2%B2", "1" * 5000, "1.5"])
async def test_malformed_versions_get_the_registrys_invalid_version(
    intake: httpx.AsyncClient, version: str
) -> None:
    response = await intake.get(f"/subjects/{DEATH}/versions/{version}")
    assert response.status_code == 422
    assert response.json()["error_code"] == 42202


@pytest.mark.integration
async def test_registration_is_idempotent_for_known_schemas_and_refused_for_others(
    intake: httpx.AsyncClient,
) -> None:
    known = CATALOGUE.latest("DeathRegistered")
    registered = await intake.post(f"/subjects/{DEATH}/versions", json={"schema": known.schema_json})
    assert registered.json() == {"id": known.schema_id}
    looked_up = await intake.post(f"/subjects/{DEATH}", json={"schema": known.schema_json})
    assert looked_up.json()["id"] == known.schema_id and looked_up.json()["version"] == known.version

    changed = {**known.schema, "fields": [*known.schema["fields"], {"name": "x", "type": "string"}]}
    refused = await intake.post(f"/subjects/{DEATH}/versions", json={"schema": json.dumps(changed)})
    assert refused.status_code == 403 and "read-only" in refused.json()["message"]
    for body in ({"schema": "{not json"}, {"schema": "[" * 3000}, {"schema": '"string"'}):
        response = await intake.post(f"/subjects/{DEATH}/versions", json=body)
        assert response.status_code == 403, body  # not a schema we hold
    malformed: list[Any] = [{"schema": 42}, ["schema"], {}]
    for wrong in malformed:
        response = await intake.post(f"/subjects/{DEATH}/versions", json=wrong)
        assert response.status_code == 422 and response.json()["error_code"] == 42201
    deep = await intake.post(
        f"/subjects/{DEATH}/versions", content=b"[" * 100_000, headers={"content-type": "application/json"}
    )
    assert deep.status_code in (413, 422), "hostile nesting is refused, not a server error"


@pytest.mark.integration
async def test_every_released_version_registers_with_its_committed_id(intake: httpx.AsyncClient) -> None:
    """The client's registration calls, against a real Confluent-API server (ours)."""
    bound = await bind_to_registry(str(intake.base_url), CATALOGUE, intake)
    assert [(e.name, e.version, e.schema_id) for e in bound.entries()] == [
        (e.name, e.version, e.schema_id) for e in CATALOGUE.entries()
    ]


def _registry_that_renumbers(offset: int) -> httpx.MockTransport:
    """A stand-in registry that gives every schema its catalogue id plus ``offset``."""

    def answer(request: httpx.Request) -> httpx.Response:
        schema: dict[str, Any] = json.loads(json.loads(request.content)["schema"])
        for entry in CATALOGUE.entries():
            if entry.schema == schema:
                return httpx.Response(200, json={"id": entry.schema_id + offset})
        return httpx.Response(409, json={"error_code": 409, "message": "incompatible"})

    return httpx.MockTransport(answer)


async def test_external_registry_ids_are_used_on_the_wire() -> None:
    async with httpx.AsyncClient(transport=_registry_that_renumbers(100)) as client:
        bound = await bind_to_registry("http://registry.invalid", CATALOGUE, client)
    value = encode("DeathRegistered", _death(), bound)
    assert int.from_bytes(value[1:5], "big") == CATALOGUE.latest("DeathRegistered").schema_id + 100
    assert decode(value, bound)[0] == "DeathRegistered"
    already_on_topics = encode("DeathRegistered", _death())  # the committed id
    assert decode(already_on_topics, bound)[0] == "DeathRegistered", "old messages still decode"


async def test_external_registry_refusal_names_the_schema() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            409, json={"error_code": 409, "message": "Schema being registered is incompatible"}
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(RegistryRefused, match=r"refused uk\.gov\.tellusonce\.BirthRegistered v1"):
            await bind_to_registry("http://registry.invalid", CATALOGUE, client)
