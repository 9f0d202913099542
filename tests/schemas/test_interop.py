"""A message on an agency topic is readable by tools nobody here wrote.

One death registration is posted and routed to DWP; its message on
``tuo.agency.dwp`` is then read by confluent-kafka's Avro deserialiser through
our schema registry endpoint, by the Apache ``avro`` Python package, by Apache
Avro's Java tools, by librdkafka (the C client of kcat), and by the CloudEvents SDK. Each must see the
same person, event id and reference the intake accepted.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import avro.io
import avro.schema
import httpx
import pytest
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary
from cloudevents.core.formats.json import JSONFormat
from confluent_kafka.schema_registry import SchemaRegistryClient, record_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from operators.services import RunningBus
from runtime.kafka import Topics
from runtime.pseudonyms import subject_id_for
from runtime.settings import Settings
from tests.support import INSPECTOR, death_registration, eventually, header, random_nino, read_topic, today
from tests.tools.avro_tools import ensure_avro_tools

pytestmark = pytest.mark.integration

AGENCY = "dwp"  # statutory for deaths, so every death registration is routed there
GIVEN_NAMES = "Ada Interop"
FAMILY_NAME = "Tooling-Smith"
EVENT_TYPE = "uk.gov.tellusonce.DeathRegistered"
AGENCY_SCHEMA = "uk.gov.tellusonce.DeathRegisteredDisclosure"  # the minimised form an agency receives


@dataclass(frozen=True)
class Routed:
    """The death registration as accepted by the intake and as found on the agency topic."""

    event_id: str
    reference: str
    subject_id: str  # what the message key must be
    date_of_death: date
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]

    @property
    def schema_id(self) -> int:
        assert self.value[0] == 0, f"magic byte is {self.value[0]}, not 0: not the Confluent wire format"
        return int.from_bytes(self.value[1:5], "big")

    @property
    def avro_body(self) -> bytes:
        return self.value[5:]

    def header(self, name: str) -> str | None:
        return next((value.decode() for key, value in self.headers if key == name), None)


@pytest.fixture(scope="module")
async def routed(bus: RunningBus, services: Settings, registrar_token: str) -> AsyncIterator[Routed]:
    nino = random_nino()
    died = today() - timedelta(days=3)
    body = death_registration(
        deceased={"given_names": GIVEN_NAMES, "family_name": FAMILY_NAME, "nino": nino},
        date_of_death=died.isoformat(),
    )
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{bus.http_port}",
        timeout=10,
        headers={"Authorization": f"Bearer {registrar_token}"},
    ) as client:
        response = await client.post("/v1/death-registrations", json=body)
    assert response.status_code == 201, response.text
    accepted = response.json()
    topic = Topics(services.topic_prefix).agency(AGENCY)

    async def on_agency_topic() -> list[Any]:
        return [r for r in await read_topic(services, topic) if header(r, "ce_id") == accepted["event_id"]]

    found = await eventually(on_agency_topic, timeout=60, what=f"the death registration on {topic}")
    assert len(found) == 1, f"{topic} holds {len(found)} copies of event {accepted['event_id']}"
    record = found[0]
    assert record.key is not None and record.value is not None
    yield Routed(
        event_id=accepted["event_id"],
        reference=accepted["reference"],
        subject_id=subject_id_for(nino, services.require_pseudonym_key()),
        date_of_death=died,
        topic=topic,
        partition=record.partition,
        offset=record.offset,
        key=bytes(record.key),
        value=bytes(record.value),
        headers=[(k, bytes(v)) for k, v in record.headers],
    )


def registry_url(bus: RunningBus) -> str:
    return f"http://127.0.0.1:{bus.http_port}"


async def test_confluent_kafka_avro_deserializer_reads_it_through_our_schema_registry(
    routed: Routed, bus: RunningBus
) -> None:
    context = SerializationContext(routed.topic, MessageField.VALUE)

    def deserialise(config: dict[str, Any] | None) -> Any:
        # Blocking HTTP to a server that runs on this test's event loop: keep it off the loop.
        with SchemaRegistryClient({"url": registry_url(bus)}) as registry:
            return AvroDeserializer(registry, conf=config)(routed.value, context)

    # As most consumers are configured (subject per topic, schema found by the id in the message),
    # and as a consumer of record-named subjects that reads with the latest registered version.
    for config in (None, {"subject.name.strategy": record_subject_name_strategy, "use.latest.version": True}):
        record = await asyncio.to_thread(deserialise, config)
        assert isinstance(record, dict), f"{config}: decoded {record!r}"
        assert record["deceased"]["given_names"] == GIVEN_NAMES, config
        assert record["deceased"]["family_name"] == FAMILY_NAME, config
        assert str(record["envelope"]["event_id"]) == routed.event_id == routed.header("ce_id")
        assert record["envelope"]["reference"] == routed.reference, config
        assert record["envelope"]["subject"]["subject_id"] == routed.subject_id, config
        assert record["date_of_death"] == routed.date_of_death, config


async def test_apache_avro_python_reads_it_with_the_schema_served_for_its_id(
    routed: Routed, intake: httpx.AsyncClient
) -> None:
    response = await intake.get(f"/schemas/ids/{routed.schema_id}")
    assert response.status_code == 200, response.text
    writer_schema = avro.schema.parse(response.json()["schema"])
    assert isinstance(writer_schema, avro.schema.RecordSchema)
    assert writer_schema.fullname == AGENCY_SCHEMA

    body = io.BytesIO(routed.avro_body)
    record = avro.io.DatumReader(writer_schema).read(avro.io.BinaryDecoder(body))
    assert body.read() == b"", "the Avro body has bytes the schema does not account for"

    assert isinstance(record, dict)
    assert record["deceased"]["given_names"] == GIVEN_NAMES
    assert record["deceased"]["family_name"] == FAMILY_NAME
    assert str(record["envelope"]["event_id"]) == routed.event_id
    assert record["envelope"]["reference"] == routed.reference
    assert record["date_of_death"] == routed.date_of_death
    assert record["envelope"]["channel"] == "DESK"


async def test_apache_avro_java_tools_render_it_as_json(
    routed: Routed, intake: httpx.AsyncClient, tmp_path: Path
) -> None:
    java = shutil.which("java")
    assert java is not None, "Java is not installed; run scripts/setup.sh (it installs a JDK)"
    jar = await asyncio.to_thread(ensure_avro_tools)  # downloads from Maven Central only when not cached

    response = await intake.get(f"/schemas/ids/{routed.schema_id}")
    assert response.status_code == 200, response.text
    schema_file = tmp_path / "writer.avsc"
    schema_file.write_text(response.json()["schema"])
    payload_file = tmp_path / "payload.avro"
    payload_file.write_bytes(routed.avro_body)  # the datum after the 5-byte Confluent framing

    tool = await asyncio.create_subprocess_exec(
        java,
        "-jar",
        str(jar),
        "fragtojson",
        "--no-pretty",
        "--schema-file",
        str(schema_file),
        str(payload_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(tool.communicate(), timeout=120)
    assert tool.returncode == 0, f"{jar.name} fragtojson failed:\n{stderr.decode()[-3000:]}"

    rendered = json.loads(stdout)
    # Avro's JSON encoding wraps a union's value in its branch name; the agency's
    # minimised form makes every field but the envelope a union with null.
    deceased = rendered["deceased"]["uk.gov.tellusonce.Person"]
    assert deceased["given_names"] == GIVEN_NAMES
    assert deceased["family_name"] == FAMILY_NAME
    assert rendered["envelope"]["event_id"] == routed.event_id
    assert rendered["envelope"]["reference"] == routed.reference
    assert rendered["envelope"]["subject"]["subject_id"] == routed.subject_id
    assert rendered["envelope"]["channel"] == "DESK"
    # Avro's JSON encoding gives a date as days since 1970-01-01.
    assert rendered["date_of_death"] == {"int": (routed.date_of_death - date(1970, 1, 1)).days}
    assert "next_of_kin.person" in rendered["withheld_fields"]


def _read_with_librdkafka(settings: Settings, topic: str, partition: int, offset: int) -> Any:
    """One message, read by librdkafka (the C client under kcat and Confluent's clients).

    Debian's kcat links librdkafka 2.0.2, whose SCRAM proof Kafka 4 refuses
    (librdkafka#4895, fixed in 2.6.1), so the test uses the confluent-kafka wheel's
    newer librdkafka over the same SASL_SSL listener.
    """
    from confluent_kafka import Consumer, TopicPartition

    user, password = settings.kafka_credentials(INSPECTOR) or ("", "")
    consumer = Consumer(
        {
            "bootstrap.servers": settings.require_bootstrap_servers(),
            "security.protocol": "SASL_SSL",
            "sasl.mechanisms": "SCRAM-SHA-512",
            "sasl.username": user,
            "sasl.password": password,
            "ssl.ca.location": str(settings.kafka_ssl_cafile),
            "group.id": f"interop-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        message = consumer.poll(30)
        assert message is not None, f"librdkafka read nothing at {topic}[{partition}]@{offset}"
        assert message.error() is None, str(message.error())
        return message
    finally:
        consumer.close()


async def test_librdkafka_sees_the_pseudonymous_key_and_cloudevents_headers(
    routed: Routed, services: Settings
) -> None:
    message = await asyncio.to_thread(
        _read_with_librdkafka, services, routed.topic, routed.partition, routed.offset
    )
    assert message.offset() == routed.offset
    assert message.key().decode() == routed.subject_id, "the key is the pseudonymous subject id"
    headers = {name: value.decode() for name, value in message.headers()}
    assert headers["ce_id"] == routed.event_id
    assert headers["ce_type"] == EVENT_TYPE
    assert headers["ce_specversion"] == "1.0"
    assert headers["ce_subject"] == routed.subject_id
    assert headers["content-type"] == "application/avro"


class KeepBytes(JSONFormat):
    """The SDK's JSON event format, but the event's data is kept as the message's raw bytes
    (the CloudEvents 2.x counterpart of 1.x's ``data_unmarshaller=lambda b: b``)."""

    def read_data(self, body: bytes, datacontenttype: str | None) -> bytes:
        return body


async def test_cloudevents_sdk_parses_the_binary_mode_message(
    routed: Routed, intake: httpx.AsyncClient
) -> None:
    message = KafkaMessage(headers=dict(routed.headers), key=routed.key, value=routed.value)
    event = from_binary(message, KeepBytes())

    assert event.get_specversion() == "1.0"
    assert event.get_id() == routed.event_id
    assert event.get_type() == EVENT_TYPE
    assert event.get_source() == "/offices/leeds"
    assert event.get_subject() == routed.subject_id
    assert event.get_datacontenttype() == "application/avro"
    assert event.get_data() == routed.value, "the data is the Confluent-framed Avro value, unchanged"
    assert event.get_extension("partitionkey") == routed.subject_id  # the SDK's name for the key
    recorded = event.get_time()
    assert recorded is not None and recorded.tzinfo is not None
    assert abs(datetime.now(UTC) - recorded) < timedelta(minutes=5)

    # ce_dataschema names the writer schema on the registry API; following its path gets that schema.
    dataschema = event.get_dataschema()
    assert dataschema is not None
    assert urlsplit(dataschema).path == f"/schemas/ids/{routed.schema_id}"
    followed = await intake.get(urlsplit(dataschema).path)
    assert followed.status_code == 200, followed.text
    assert json.loads(followed.json()["schema"])["name"] == AGENCY_SCHEMA
