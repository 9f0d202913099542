"""Components that `tuo run` runs as child processes of its own (further routers with
``TUO_ROUTER_PROCESSES``; with ``TUO_PROCESS_PER_COMPONENT``, every component but intake
when it runs several): each its own Python, so one's CPU never stalls another's I/O.

A child is `tuo run <component>` with ``TUO_PARENT_PID`` set. It asks the kernel to
kill it when its parent dies, however the parent dies (``die_with_parent``), so a
SIGKILLed `tuo run` never leaves routers behind. The parent supervises each child like
a component of its own (``operators.services.supervise``): one that exits is restarted
with backoff; on shutdown each gets SIGTERM, and SIGKILL if it has not stopped in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import IO

import structlog

log = structlog.get_logger(__name__)

PARENT_PID = "TUO_PARENT_PID"
STOP_GRACE_SECONDS = 30.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ChildExited(RuntimeError):
    """A child process stopped while the bus was running; its supervisor restarts it."""


def die_with_parent() -> None:
    """In a child (``TUO_PARENT_PID`` set): be killed when the parent dies. Exits at once
    if the parent is already gone. Elsewhere than Linux the parent's shutdown still stops it."""
    parent = os.environ.get(PARENT_PID)
    if not parent:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(parent):
        sys.exit("the `tuo run` that started this process has stopped")


def child_process(
    component: str, env: Mapping[str, str], log_file: Path | None = None
) -> Callable[[asyncio.Event], Awaitable[None]]:
    """`tuo run <component>` as a child, for ``supervise``: runs until ``stop`` is set;
    raises ChildExited if the child stops first. Its logs go where the parent's go."""

    async def run(stop: asyncio.Event) -> None:
        stderr: IO[bytes] | None = None if log_file is None else log_file.open("ab")
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "operators.cli",
                "run",
                component,
                env={**env, PARENT_PID: str(os.getpid())},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,  # its banner; its logs are on stderr
                stderr=stderr,
                start_new_session=True,  # Ctrl-C reaches the parent, which stops its children
            )
            log.info("child_started", component=component, pid=process.pid)
            exited = asyncio.ensure_future(process.wait())
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not stop.is_set():
                    raise ChildExited(f"{component} (pid {process.pid}) exited with {process.returncode}")
                with contextlib.suppress(ProcessLookupError):  # it may have just exited
                    process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.shield(exited), STOP_GRACE_SECONDS)
                except TimeoutError:
                    log.warning("child_killed", component=component, pid=process.pid)
            finally:
                stopping.cancel()
                if process.returncode is None:
                    process.kill()
                await exited
        finally:
            if stderr is not None:
                stderr.close()

    return run
