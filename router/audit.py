"""The tamper-evident record of routing decisions.

Decisions are appended to ``routing_decision`` in one order (``seq``); each row
stores the hash of the previous row and a SHA-256 over its own content and that
previous hash. ``verify`` recomputes the chain and names every row that was altered,
removed or inserted. Not caught yet: removing the newest rows, or rewriting the
whole table by someone who knows the scheme; anchoring the head outside the
database is the next step (the decisions topic in Kafka is an independent copy).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

GENESIS = "0" * 64
# Any fixed number shared by every writer of the chain.
_CHAIN_LOCK = 0x7475_6F01


@dataclass(frozen=True)
class Decision:
    event_id: str
    agency: str
    event_type: str
    outcome: str
    legal_basis: str | None
    decided_at: datetime
    fields_delivered: Sequence[str]
    fields_withheld: Sequence[str]
    subscription_version: int | None = None

    @classmethod
    def of(cls, source: Mapping[str, Any]) -> Decision:
        """From a decoded RoutingDecision message or a stored row (same field names)."""
        return cls(
            event_id=str(source["event_id"]),
            agency=source["agency"],
            event_type=source["event_type"],
            outcome=source["outcome"],
            legal_basis=source["legal_basis"],
            decided_at=source["decided_at"],
            fields_delivered=source["fields_delivered"],
            fields_withheld=source["fields_withheld"],
            subscription_version=source.get("subscription_version"),
        )


def row_hash(seq: int, decision: Decision, prev_hash: str) -> str:
    content = "\x1f".join(
        [
            str(seq),
            str(decision.event_id),
            decision.agency,
            decision.event_type,
            decision.outcome,
            decision.legal_basis or "",
            decision.decided_at.isoformat(),
            ",".join(sorted(decision.fields_delivered)),
            ",".join(sorted(decision.fields_withheld)),
            prev_hash,
        ]
        # Since migration 0035; a row without a version hashes as it always did.
        + ([] if decision.subscription_version is None else [f"v{decision.subscription_version}"])
    )
    return hashlib.sha256(content.encode()).hexdigest()


async def append_many(conn: asyncpg.Connection, decisions: Sequence[Decision]) -> int:
    """Append decisions in their order, skipping any already chained (or repeated in
    ``decisions``): one lock, one look-up and a pipelined insert for the lot. Call
    inside a transaction; returns how many rows were added."""
    if not decisions:
        return 0
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _CHAIN_LOCK)
    keys = [(uuid.UUID(d.event_id), d.agency) for d in decisions]
    chained = {
        (r["event_id"], r["agency"])
        for r in await conn.fetch(
            "SELECT d.event_id, d.agency FROM routing_decision d"
            "  JOIN unnest($1::uuid[], $2::text[]) AS k(event_id, agency)"
            "    ON d.event_id = k.event_id AND d.agency = k.agency",
            [e for e, _ in keys],
            [a for _, a in keys],
        )
    }
    head = await conn.fetchrow("SELECT seq, hash FROM routing_decision ORDER BY seq DESC LIMIT 1")
    seq = 0 if head is None else head["seq"]
    prev_hash = GENESIS if head is None else head["hash"]
    rows = []
    for key, decision in zip(keys, decisions, strict=True):
        if key in chained:
            continue
        chained.add(key)
        seq += 1
        hashed = row_hash(seq, decision, prev_hash)
        rows.append(
            (
                key[0],
                decision.agency,
                decision.event_type,
                decision.outcome,
                decision.legal_basis,
                decision.decided_at,
                list(decision.fields_delivered),
                list(decision.fields_withheld),
                seq,
                prev_hash,
                hashed,
                decision.subscription_version,
            )
        )
        prev_hash = hashed
    await conn.executemany(
        "INSERT INTO routing_decision (event_id, agency, event_type, outcome, legal_basis, decided_at,"
        " fields_delivered, fields_withheld, seq, prev_hash, hash, subscription_version)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        rows,
    )
    return len(rows)


async def seal_unsealed(conn: asyncpg.Connection) -> int:
    """Chain rows that predate the chain (migration 0002 numbered them but could not
    hash them in SQL). Runs before the tracker appends; returns how many were sealed.
    The hashes are chained in memory and written in one pipelined statement, so sealing
    takes a read and a write, not two round trips per row."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _CHAIN_LOCK)
        rows = await conn.fetch("SELECT * FROM routing_decision WHERE hash IS NULL ORDER BY seq")
        hashes: dict[int, str] = {0: GENESIS}  # seq → hash, of the rows sealed here
        sealed: list[tuple[int, str, str]] = []
        for row in rows:
            seq = row["seq"]
            prev_hash = hashes.get(seq - 1)
            if prev_hash is None:  # the row before was sealed already (or is missing)
                prev_hash = await conn.fetchval("SELECT hash FROM routing_decision WHERE seq = $1", seq - 1)
            hashes[seq] = row_hash(seq, Decision.of(row), prev_hash)
            sealed.append((seq, prev_hash, hashes[seq]))
        await conn.executemany("UPDATE routing_decision SET prev_hash = $2, hash = $3 WHERE seq = $1", sealed)
    return len(rows)


@dataclass(frozen=True)
class Finding:
    seq: int
    kind: str  # altered, removed, inserted
    detail: str

    def __str__(self) -> str:
        return f"row {self.seq} {self.kind}: {self.detail}"


async def verify(conn: asyncpg.Connection, batch: int = 10_000) -> tuple[int, list[Finding]]:
    """Recompute the chain. Returns (rows checked, findings in chain order)."""
    return await verify_chain(
        conn,
        "routing_decision",
        lambda row: row_hash(row["seq"], Decision.of(row), row["prev_hash"] or ""),
        lambda row: f"event {row['event_id']}, agency {row['agency']}",
        batch,
    )


async def verify_chain(
    conn: asyncpg.Connection,
    table: str,
    hash_of: Callable[[Any], str],
    where: Callable[[Any], str],
    batch: int = 10_000,
) -> tuple[int, list[Finding]]:
    """Walk a chain of rows numbered by ``seq`` (1, 2, …), each holding ``prev_hash`` and
    ``hash``: (rows checked, every row removed, inserted or altered, in chain order)."""
    findings: list[Finding] = []
    expected_seq, previous_hash, checked = 1, GENESIS, 0
    last_seq = 0
    while True:
        rows = await conn.fetch(
            f"SELECT * FROM {table} WHERE seq > $1 ORDER BY seq LIMIT $2", last_seq, batch
        )
        if not rows:
            break
        for row in rows:
            findings += _check(row, expected_seq, previous_hash, hash_of, where)
            checked += 1
            expected_seq, previous_hash, last_seq = row["seq"] + 1, row["hash"], row["seq"]
    return checked, findings


def _check(
    row: Any,
    expected_seq: int,
    previous_hash: str,
    hash_of: Callable[[Any], str],
    where_of: Callable[[Any], str],
) -> list[Finding]:
    found = []
    seq = row["seq"]
    where = where_of(row)
    if seq > expected_seq:
        missing = (
            f"row {expected_seq} is" if seq == expected_seq + 1 else f"rows {expected_seq}-{seq - 1} are"
        )
        found.append(Finding(expected_seq, "removed", f"{missing} missing before row {seq}"))
    elif row["prev_hash"] != previous_hash:
        found.append(Finding(seq, "inserted", f"{where}: does not follow the row before it"))
    if row["hash"] != hash_of(row):
        found.append(Finding(seq, "altered", f"{where}: its content no longer matches its hash"))
    return found
