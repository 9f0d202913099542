"""A throwaway local stack for one benchmark run: started in a scratch state
directory, purged afterwards, also when the run is stopped with SIGTERM."""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime.settings import Settings
from runtime.stack import LocalStack

PROJECT = Path(__file__).resolve().parent.parent


@contextmanager
def scratch_stack() -> Iterator[tuple[Path, dict[str, str]]]:
    """Yield the state directory and the stack's ``TUO_*`` addresses."""
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the stack is always purged.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    state = Path(tempfile.mkdtemp(prefix="bench-", dir=PROJECT / ".tuo"))
    state.chmod(0o755)
    stack = LocalStack(state, PROJECT / ".tuo" / "cache", Settings().kafka_version)
    try:
        stack.up()
        yield (
            state,
            dict(line.split("=", 1) for line in stack.env_file.read_text().splitlines() if "=" in line),
        )
    finally:
        stack.purge()
        shutil.rmtree(state, ignore_errors=True)
