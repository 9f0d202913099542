"""Codec throughput against bare fastavro, measured in the same run.

    .venv/bin/python -m bench.codec [--records 50000] [--rounds 5]

Encodes and decodes a realistic DeathRegistered record (the golden vector's) with
our codec (Confluent framing, catalogue lookup) and with fastavro's
``schemaless_writer``/``schemaless_reader`` on the same parsed schema; then
decodes v1 bytes against a scratch catalogue where the schema has a v2, which
exercises resolution to the latest version, against fastavro given the same
writer and reader schemas. Prints records/s and our/baseline ratios (best of N).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro
from fastavro import schemaless_reader, schemaless_writer

from schemas.catalogue import CATALOGUE, NAMESPACE, SOURCE_DIR, VERSIONS_DIR, SchemaCatalogue
from schemas.codec import decode, encode
from schemas.evolution import release
from tests.golden.make_vectors import EXAMPLES


def _best_rate(work: Callable[[], None], records: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return records / best


def run(records: int, rounds: int) -> dict[str, Any]:
    entry = CATALOGUE.latest("DeathRegistered")
    record = EXAMPLES["DeathRegistered"]
    framed = encode("DeathRegistered", record)
    body = framed[5:]

    def ours_encode() -> None:
        for _ in range(records):
            encode("DeathRegistered", record)

    def bare_encode() -> None:
        for _ in range(records):
            buffer = io.BytesIO()
            schemaless_writer(buffer, entry.parsed, record)
            buffer.getvalue()

    def ours_decode() -> None:
        for _ in range(records):
            decode(framed)

    def bare_decode() -> None:
        for _ in range(records):
            schemaless_reader(io.BytesIO(body), entry.parsed, None)

    evolved = _catalogue_with_a_second_version()
    writer, reader = evolved.version("DeathRegistered", 1), evolved.latest("DeathRegistered")

    def ours_resolve() -> None:
        for _ in range(records):
            decode(framed, evolved)

    def bare_resolve() -> None:
        for _ in range(records):
            schemaless_reader(io.BytesIO(body), writer.parsed, reader.parsed)

    rates = {
        "encode_ours": _best_rate(ours_encode, records, rounds),
        "encode_fastavro": _best_rate(bare_encode, records, rounds),
        "decode_ours": _best_rate(ours_decode, records, rounds),
        "decode_fastavro": _best_rate(bare_decode, records, rounds),
        "resolve_ours": _best_rate(ours_resolve, records, rounds),
        "resolve_fastavro": _best_rate(bare_resolve, records, rounds),
    }
    return {
        "records_per_round": records,
        "rounds": rounds,
        "message_bytes": len(framed),
        "python": platform.python_version(),
        "fastavro": fastavro.__version__,
        **{k: round(v) for k, v in rates.items()},
        "encode_ratio": round(rates["encode_ours"] / rates["encode_fastavro"], 3),
        "decode_ratio": round(rates["decode_ours"] / rates["decode_fastavro"], 3),
        "resolve_ratio": round(rates["resolve_ours"] / rates["resolve_fastavro"], 3),
    }


def _catalogue_with_a_second_version() -> SchemaCatalogue:
    """A scratch catalogue where DeathRegistered has a v2 (one optional field more),
    so decoding v1 bytes exercises schema resolution."""
    scratch = Path(tempfile.mkdtemp(prefix="tuo-bench-"))
    shutil.copytree(SOURCE_DIR, scratch / "avro")
    shutil.copytree(VERSIONS_DIR, scratch / "versions")
    source = scratch / "avro" / f"{NAMESPACE}.DeathRegistered.avsc"
    schema = json.loads(source.read_text())
    schema["fields"].append({"name": "coroner_case", "type": ["null", "string"], "default": None})
    source.write_text(json.dumps(schema))
    outcome = release(scratch / "avro", scratch / "versions")
    assert outcome.released and not outcome.problems, outcome
    catalogue = SchemaCatalogue(scratch / "versions")
    shutil.rmtree(scratch)
    return catalogue


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = run(args.records, args.rounds)
    print(f"DeathRegistered, {result['message_bytes']} bytes framed; best of {args.rounds} x {args.records}")
    print(
        f"  encode  ours {result['encode_ours']:>9,}/s   fastavro {result['encode_fastavro']:>9,}/s"
        f"   ratio {result['encode_ratio']:.3f}"
    )
    print(
        f"  decode  ours {result['decode_ours']:>9,}/s   fastavro {result['decode_fastavro']:>9,}/s"
        f"   ratio {result['decode_ratio']:.3f}"
    )
    print(
        f"  resolve ours {result['resolve_ours']:>9,}/s   fastavro {result['resolve_fastavro']:>9,}/s"
        f"   ratio {result['resolve_ratio']:.3f}   (v1 bytes read as v2)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
