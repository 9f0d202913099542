"""Keys land on the partition Kafka's own clients would choose: the router, replay and
the benchmarks compute murmur2 themselves, once per message, instead of aiokafka's
byte-at-a-time version. A wrong hash would put a subject's events on two partitions
and break their order."""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from runtime.kafka import murmur2, partition_of

# Kafka's own test vectors (clients' UtilsTest.testMurmur2), as Java's signed ints.
JAVA = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("key", "java"), JAVA.items())
def test_the_java_clients_hash(key: bytes, java: int) -> None:
    assert murmur2(key) == java % 2**32


def test_the_same_hash_as_aiokafka_for_every_length_and_byte() -> None:
    rng = random.Random(20261207)
    for length in range(0, 70):
        for _ in range(30):
            key = bytes(rng.randrange(256) for _ in range(length))
            assert murmur2(key) == aiokafka_murmur2(key), key


def test_the_partition_the_default_partitioner_chooses() -> None:
    rng, default = random.Random(7), DefaultPartitioner()
    for _ in range(2000):
        key = f"s-{rng.getrandbits(128):032x}".encode()
        for count in (1, 3, 12):
            partitions = list(range(count))
            assert partition_of(key, count) == default(key, partitions, partitions)


def test_a_long_key_hashes_as_a_short_one_does() -> None:
    key = bytes(range(256)) * 8 + b"xyz"  # beyond the readers kept for each length
    assert murmur2(key) == aiokafka_murmur2(key)
    assert murmur2(key) == aiokafka_murmur2(key)
