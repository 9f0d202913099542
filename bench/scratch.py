"""A throwaway local stack for one benchmark run: started in a scratch state
directory, purged afterwards, also when the run is stopped with SIGTERM.

The stack is secured like any local stack (SASL/SCRAM-SHA-512 over TLS, deny
unless an ACL allows), and it grants the bus's components their ACLs for the
"tuo" prefix only. A benchmark runs the bus under a prefix of its own, so it
grants them for that prefix with ``deploy_bus``. Its baseline clients and its
watchers act as ``BENCH_USER``, which may read and write everything, over the
same TLS and SASL as the bus's own clients.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from devstack import LocalStack
from runtime import kafka
from runtime.access import grant_components, grant_full_access, onboard_agency
from runtime.settings import Settings

PROJECT = Path(__file__).resolve().parent.parent

# The benchmarks' own Kafka user: the bare baselines read and write scratch topics, and
# the watchers read any consumer group's offsets. The bus itself never uses it.
BENCH_USER = "bench-client"


@dataclass(frozen=True)
class ScratchStack:
    state_dir: Path
    env: dict[str, str]  # the stack's TUO_* settings, as it wrote them to stack.env

    def settings(self, topic_prefix: str = "bench", **overrides: Any) -> Settings:
        """Settings for this process on topics under ``topic_prefix``: the stack's
        addresses, TLS, credentials and keys win over this shell's TUO_* variables."""
        values: dict[str, Any] = {
            name.removeprefix("TUO_").lower(): value for name, value in self.env.items()
        }
        return Settings(
            **{
                **values,
                "state_dir": self.state_dir,
                "topic_prefix": topic_prefix,
                "log_level": "WARNING",
                **overrides,
            }
        )

    def service_env(self, topic_prefix: str, http_port: int) -> dict[str, str]:
        """The environment for `tuo run` on this stack, on topics under ``topic_prefix``:
        the stack's settings and nothing from this shell's TUO_* variables."""
        return self.env | {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "TUO_STATE_DIR": str(self.state_dir),
            "TUO_HTTP_PORT": str(http_port),
            "TUO_LOG_LEVEL": "WARNING",
            "TUO_TOPIC_PREFIX": topic_prefix,
            # One load generator with one token is the whole load: a per-client limit it
            # never reaches, so the limiter runs but refuses nothing.
            "TUO_HTTP_RATE_LIMIT_PER_MINUTE": "1000000",
            "TUO_API_RATE_LIMIT_PER_MINUTE": "1000000",
        }


@contextmanager
def scratch_stack() -> Iterator[ScratchStack]:
    """Start the stack, with ``BENCH_USER``; yield it; purge it."""
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the stack is always purged.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    state = Path(tempfile.mkdtemp(prefix="bench-", dir=PROJECT / ".tuo"))
    state.chmod(0o755)
    stack = LocalStack(state, PROJECT / ".tuo" / "cache", Settings().kafka_version)
    try:
        stack.up()
        env = dict(line.split("=", 1) for line in stack.env_file.read_text().splitlines() if "=" in line)
        scratch = ScratchStack(state, env)
        asyncio.run(_grant_bench_user(scratch.settings()))
        yield scratch
    finally:
        stack.purge()
        shutil.rmtree(state, ignore_errors=True)


async def _grant_bench_user(settings: Settings) -> None:
    """Create ``BENCH_USER`` with every right; its password goes to the stack's credentials
    file, where ``connection_options`` finds it."""
    await grant_full_access(settings, BENCH_USER)


def bench_client_options(settings: Settings) -> dict[str, Any]:
    """Bootstrap servers, TLS and SASL for a raw aiokafka client acting as ``BENCH_USER``."""
    return kafka.connection_options(settings, BENCH_USER)


async def deploy_bus(settings: Settings, pool: asyncpg.Pool, agencies: Iterable[str] = ()) -> None:
    """Let the bus's components work under ``settings.topic_prefix`` (their ACLs), and
    onboard ``agencies`` under it (principal, ACLs, topics), so their consumers may run."""
    await grant_components(settings)
    for agency in agencies:
        await onboard_agency(settings, pool, agency, [], by="bench", reinstate=True)
