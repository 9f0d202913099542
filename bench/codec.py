"""Codec throughput against bare fastavro, measured in the same run.

    .venv/bin/python -m bench.codec [--records 50000] [--rounds 5]

Encodes and decodes a realistic DeathRegistered record (the golden vector's) with
our codec (Confluent framing, catalogue lookup) and with fastavro's
``schemaless_writer``/``schemaless_reader`` on the same parsed schema; then
decodes the current bytes against a scratch catalogue where the schema has one
more version, which exercises resolution to the latest version, against fastavro
given the same writer and reader schemas. Both codecs must decode the record as
it was, and every loop must produce every record, before a rate is printed.
Prints records/s and our/baseline ratios (best of N).
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

from bench.arrivals import require_all_arrived
from schemas.catalogue import CATALOGUE, NAMESPACE, SOURCE_DIR, VERSIONS_DIR, SchemaCatalogue
from schemas.codec import decode, encode, schema_id_of
from schemas.evolution import release
from tests.golden.make_vectors import EXAMPLES


class Tally:
    """Records each workload really produced, so no rate is printed for a loop that did
    less than it claims."""

    def __init__(self) -> None:
        self.asked = 0
        self.done = 0


def _best_rate(work: Callable[[], int], records: int, rounds: int, tally: Tally) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        produced = work()
        best = min(best, time.perf_counter() - started)
        tally.asked += records
        tally.done += produced
    return records / best


def run(records: int, rounds: int) -> dict[str, Any]:
    entry = CATALOGUE.latest("DeathRegistered")
    record = EXAMPLES["DeathRegistered"]
    framed = encode("DeathRegistered", record)
    body = framed[5:]

    def ours_encode() -> int:
        done = 0
        for _ in range(records):
            done += len(encode("DeathRegistered", record)) > 5
        return done

    def bare_encode() -> int:
        done = 0
        for _ in range(records):
            buffer = io.BytesIO()
            schemaless_writer(buffer, entry.parsed, record)
            done += len(buffer.getvalue()) > 0
        return done

    def ours_decode() -> int:
        done = 0
        for _ in range(records):
            done += decode(framed) is not None
        return done

    def bare_decode() -> int:
        done = 0
        for _ in range(records):
            done += schemaless_reader(io.BytesIO(body), entry.parsed, None) is not None
        return done

    evolved = _catalogue_with_a_second_version()
    # The writer is the version that wrote ``framed`` (the current latest, which the
    # scratch catalogue's extra version supersedes), not v1: fastavro must be told it.
    writer, reader = evolved.by_id(schema_id_of(framed)), evolved.latest("DeathRegistered")

    def ours_resolve() -> int:
        done = 0
        for _ in range(records):
            done += decode(framed, evolved) is not None
        return done

    def bare_resolve() -> int:
        done = 0
        for _ in range(records):
            done += schemaless_reader(io.BytesIO(body), writer.parsed, reader.parsed) is not None
        return done

    # Both codecs must agree with the record before either is timed.
    require_all_arrived(
        "codec: our decode of our encoding equals the record", 1, int(_same(decode(framed)[1], record))
    )
    bare = schemaless_reader(io.BytesIO(body), entry.parsed, None)
    require_all_arrived("codec: fastavro's decode equals the record", 1, int(_same(bare, record)))
    tally = Tally()
    rates = {
        "encode_ours": _best_rate(ours_encode, records, rounds, tally),
        "encode_fastavro": _best_rate(bare_encode, records, rounds, tally),
        "decode_ours": _best_rate(ours_decode, records, rounds, tally),
        "decode_fastavro": _best_rate(bare_decode, records, rounds, tally),
        "resolve_ours": _best_rate(ours_resolve, records, rounds, tally),
        "resolve_fastavro": _best_rate(bare_resolve, records, rounds, tally),
    }
    require_all_arrived("codec: records encoded or decoded", tally.asked, tally.done)
    return {
        "sent": tally.asked,
        "arrived": tally.done,
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


def _same(decoded: Any, record: dict[str, Any]) -> bool:
    """Equal as data (fastavro gives back aware datetimes in UTC, dates as dates)."""
    return json.dumps(decoded, default=str, sort_keys=True) == json.dumps(record, default=str, sort_keys=True)


def _catalogue_with_a_second_version() -> SchemaCatalogue:
    """A scratch catalogue where DeathRegistered has a v2 (one optional field more),
    so decoding the current bytes exercises schema resolution."""
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
        f"   ratio {result['resolve_ratio']:.3f}   (current bytes read as the next version)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
