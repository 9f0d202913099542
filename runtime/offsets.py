"""A consumer group's committed offsets, read only once they are stable (KIP-447).

An offset committed inside a Kafka transaction becomes visible to ``OffsetFetch``
shortly *after* the transaction completes: the group coordinator applies the commit
marker asynchronously. A router that takes over a partition right after its previous
owner committed could read the offset from before that commit and route the same
records again. Since Kafka 2.5, ``OffsetFetch`` v7 with ``require_stable`` answers
``UNSTABLE_OFFSET_COMMIT`` while such a commit is pending, and the reader retries.
aiokafka sends v3 at most, so this module sends v7 itself, through the consumer's own
connection to its group coordinator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.client import ConnectionGroup
from aiokafka.errors import for_code
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Int64,
    Schema,
    TaggedFields,
)
from aiokafka.structs import TopicPartition

UNSTABLE_OFFSET_COMMIT = 88
COORDINATOR_MOVED = (15, 16)  # COORDINATOR_NOT_AVAILABLE, NOT_COORDINATOR; retried like 14, LOAD_IN_PROGRESS
RETRY_SECONDS = 0.05
PATIENCE_SECONDS = 20.0  # a transaction the broker has not settled in this long is stuck


class UnstableOffsets(RuntimeError):
    """The offsets stayed pending (or the coordinator unavailable) for ``PATIENCE_SECONDS``."""


class _OffsetFetchResponse_v7(Response):  # type: ignore[misc]  # aiokafka's protocol is untyped here
    API_KEY = 9
    API_VERSION = 7
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                (
                    "partitions",
                    CompactArray(
                        ("partition_index", Int32),
                        ("committed_offset", Int64),
                        ("committed_leader_epoch", Int32),
                        ("metadata", CompactString("utf-8")),
                        ("error_code", Int16),
                        ("tags", TaggedFields),
                    ),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("error_code", Int16),
        ("tags", TaggedFields),
    )


class _OffsetFetchRequest_v7(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 9
    API_VERSION = 7
    RESPONSE_TYPE = _OffsetFetchResponse_v7
    SCHEMA = Schema(
        ("group_id", CompactString("utf-8")),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("partition_indexes", CompactArray(Int32)),
                ("tags", TaggedFields),
            ),
        ),
        ("require_stable", Boolean),
        ("tags", TaggedFields),
    )


class _StableOffsetFetch(Request[_OffsetFetchRequest_v7]):  # type: ignore[misc]
    API_KEY = 9

    def __init__(self, group_id: str, partitions: Iterable[TopicPartition]) -> None:
        by_topic: dict[str, list[int]] = {}
        for tp in partitions:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
        self._group_id = group_id
        self._topics: list[tuple[str, list[int], dict[int, bytes]]] = [
            (topic, sorted(parts), {}) for topic, parts in by_topic.items()
        ]

    def build(self, request_struct_class: type[_OffsetFetchRequest_v7]) -> _OffsetFetchRequest_v7:
        return request_struct_class(self._group_id, self._topics, True, {})


async def stable_committed(
    consumer: AIOKafkaConsumer, group_id: str, partitions: Iterable[TopicPartition]
) -> dict[TopicPartition, int | None]:
    """Each partition's committed offset for ``group_id`` (None: nothing committed),
    waiting while a transaction's commit of it is still being applied."""
    wanted = list(partitions)
    deadline = time.monotonic() + PATIENCE_SECONDS
    # aiokafka has no public way to send a request of our own: use the consumer's
    # client and its group coordinator connection, as its own offset fetch does.
    coordinator: Any = consumer._coordinator
    client: Any = consumer._client
    while True:
        await coordinator.ensure_coordinator_known()
        response = await client.send(
            coordinator.coordinator_id,
            _StableOffsetFetch(group_id, wanted),
            group=ConnectionGroup.COORDINATION,
        )
        codes = {response.error_code}
        found: dict[TopicPartition, int | None] = {}
        for topic, parts, _ in response.topics:
            for partition, offset, _epoch, _metadata, error_code, _tags in parts:
                codes.add(error_code)
                found[TopicPartition(topic, partition)] = offset if offset >= 0 else None
        codes.discard(0)
        if not codes:
            return {tp: found.get(tp) for tp in wanted}
        for code in codes - {UNSTABLE_OFFSET_COMMIT}:
            error = for_code(code)
            if code in COORDINATOR_MOVED:
                coordinator.coordinator_dead()  # found again on the next round
            elif not error.retriable:
                raise error()
        if time.monotonic() > deadline:
            raise UnstableOffsets(
                f"offsets of {group_id} not readable after {PATIENCE_SECONDS:.0f}s: {codes}"
            )
        await asyncio.sleep(RETRY_SECONDS)
