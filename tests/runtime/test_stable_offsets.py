"""A router taking over a partition reads its committed offset only once the previous
owner's transaction has settled (KIP-447's stable offset fetch), on the real broker."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka.structs import TopicPartition

from runtime import kafka
from runtime.access import Principal, grant_components
from runtime.kafka import Topics, ensure_topics
from runtime.offsets import stable_committed
from runtime.settings import Settings


async def test_an_offset_committed_in_an_open_transaction_is_read_only_once_it_commits(
    services: Settings,
) -> None:
    settings = services.model_copy(update={"topic_prefix": "so" + uuid.uuid4().hex[:8]})
    await grant_components(settings)
    await ensure_topics(settings, [], principal=Principal.OPERATOR)
    topics = Topics(settings.topic_prefix)
    group = f"{settings.topic_prefix}.router"
    tp = TopicPartition(topics.life_events, 0)
    consumer = kafka.consumer(settings, principal=Principal.ROUTER, group_id=group, client_id="test-stable")
    producer = kafka.producer(
        settings,
        principal=Principal.ROUTER,
        client_id="test-stable",
        transactional_id=f"{settings.topic_prefix}.router.{tp.topic}.{tp.partition}",
    )
    await consumer.start()
    await producer.start()
    try:
        assert await stable_committed(consumer, group, [tp]) == {tp: None}  # nothing committed yet

        async with producer.transaction():
            await producer.send_offsets_to_transaction({tp: 5}, group)
        assert await stable_committed(consumer, group, [tp]) == {tp: 5}

        await producer.begin_transaction()
        await producer.send_offsets_to_transaction({tp: 9}, group)
        reading = asyncio.ensure_future(stable_committed(consumer, group, [tp]))
        await asyncio.sleep(2)
        # aiokafka's own read does not wait: it gives the offset from before the transaction.
        assert await consumer.committed(tp) == 5
        assert not reading.done(), "the stable read answered while the commit was still pending"
        await producer.commit_transaction()
        assert await asyncio.wait_for(reading, timeout=30) == {tp: 9}

        await producer.begin_transaction()
        await producer.send_offsets_to_transaction({tp: 12}, group)
        reading = asyncio.ensure_future(stable_committed(consumer, group, [tp]))
        await asyncio.sleep(1)
        assert not reading.done()
        await producer.abort_transaction()
        assert await asyncio.wait_for(reading, timeout=30) == {tp: 9}  # an aborted commit never counts
    finally:
        await producer.stop()
        await consumer.stop()
