"""The event contract: Avro schemas (``avro/*.avsc``, the single source of truth),
their released versions and wire ids (``versions/``), the codec that frames Avro
in the Confluent wire format, CloudEvents headers, and the pydantic models that
mirror the schemas."""

from schemas.catalogue import CATALOGUE, SchemaCatalogue, UnknownSchema
from schemas.codec import UndecodableMessage, decode, encode

__all__ = ["CATALOGUE", "SchemaCatalogue", "UndecodableMessage", "UnknownSchema", "decode", "encode"]
