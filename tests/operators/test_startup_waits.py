"""A component started while Kafka or PostgreSQL is restarting waits for it, with
backoff, instead of exiting; anything else still fails at once."""

from __future__ import annotations

import pytest
from aiokafka.errors import KafkaConnectionError
from structlog.testing import capture_logs

from operators import services


async def test_startup_waits_for_a_server_that_is_coming_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "RESTART_BACKOFF_SECONDS", (0.01,))
    failures = [ConnectionRefusedError("postgres restarting"), KafkaConnectionError("broker restarting")]

    async def attempt() -> str:
        if failures:
            raise failures.pop(0)
        return "connected"

    with capture_logs() as logs:
        assert await services.at_startup("the servers", attempt) == "connected"
    waits = [line for line in logs if line["event"] == "startup_waiting"]
    assert [w["error"] for w in waits] == ["ConnectionRefusedError", "KafkaConnectionError"]
    assert all(w["what"] == "the servers" for w in waits)


async def test_startup_gives_up_after_its_patience(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "RESTART_BACKOFF_SECONDS", (0.01,))
    monkeypatch.setattr(services, "STARTUP_PATIENCE_SECONDS", 0.05)

    async def attempt() -> None:
        raise ConnectionRefusedError("nobody there")

    with pytest.raises(ConnectionRefusedError):
        await services.at_startup("postgresql", attempt)


async def test_a_mistake_is_not_waited_for() -> None:
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError):
        await services.at_startup("kafka topics", attempt)
    assert calls == 1
