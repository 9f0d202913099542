"""The event contract: Avro schemas (``avro/*.avsc``, the single source of truth),
the schema catalogue that gives each schema its wire id, and the codec that
frames Avro in the Confluent wire format."""

from schemas.catalogue import CATALOGUE, SchemaCatalogue, UnknownSchema
from schemas.codec import UndecodableMessage, decode, encode

__all__ = ["CATALOGUE", "SchemaCatalogue", "UndecodableMessage", "UnknownSchema", "decode", "encode"]
