"""Dead letters: a message no component could process, kept with why and where from.

Nothing is dropped: a message that fails to decode or validate is copied to a
dead-letter topic with headers naming the reason, origin and failing component,
and its offset is then committed so the partition keeps moving. The router and
the receipt tracker write ``<prefix>.dead-letters``; each agency's SDK writes its
own ``<prefix>.dead-letters.agency.<agency>``. Operators read and redrive them
with ``operators.dead_letters`` (``tuo dlq``).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka.structs import ConsumerRecord


@dataclass(frozen=True)
class DeadLetter:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def dead_letter(record: ConsumerRecord[bytes, bytes], component: str, reason: str) -> DeadLetter:
    headers = [(k, v) for k, v in record.headers if not k.startswith("tuo_dlq_")]
    headers += [
        ("tuo_dlq_reason", reason[:1000].encode()),
        ("tuo_dlq_component", component.encode()),
        ("tuo_dlq_topic", record.topic.encode()),
        ("tuo_dlq_partition", str(record.partition).encode()),
        ("tuo_dlq_offset", str(record.offset).encode()),
    ]
    return DeadLetter(key=record.key, value=record.value, headers=headers)
