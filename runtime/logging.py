"""structlog configuration: JSON lines to stderr, context from contextvars.

Log event ids, references, agencies and counts; never names, addresses, dates
of birth or national insurance numbers. ``runtime.redaction`` scrubs every line,
structlog's and the standard library's alike, as a second line of defence.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog

from runtime.redaction import RedactingLogRecordFactory, redact_personal_data
from runtime.settings import Settings


def _stderr_logger(*_: Any) -> structlog.PrintLogger:
    # Look sys.stderr up per logger, not once: test runners and CLI harnesses swap
    # and close it, and a logger holding a closed stream would crash its component.
    return structlog.PrintLogger(sys.stderr)


def configure_logging(settings: Settings, log_file: Path | None = None) -> None:
    """JSON (or console) lines to stderr, or appended to ``log_file`` when given
    (the demo keeps the terminal for its tables and the logs in the state dir)."""
    level = logging.getLevelName(settings.log_level)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if settings.log_format == "json"
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_personal_data,  # last before rendering: it sees everything that is written
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_stderr_logger if log_file is None else _FileLoggerFactory(log_file),
        cache_logger_on_first_use=False,
    )
    # aiokafka logs through the standard library; keep its noise at WARNING.
    handler: logging.Handler = (
        logging.StreamHandler(sys.stderr) if log_file is None else logging.FileHandler(log_file)
    )
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    # Scrubbed as each record is made, whichever handler writes it (uvicorn has its own).
    if not isinstance(logging.getLogRecordFactory(), RedactingLogRecordFactory):
        logging.setLogRecordFactory(RedactingLogRecordFactory(logging.getLogRecordFactory()))


@contextmanager
def configured_logging(settings: Settings, log_file: Path | None = None) -> Iterator[None]:
    """``configure_logging`` for the length of a block, then the logging configuration
    that was there before: structlog's, the root logger's level and handlers, and the
    record factory (a test capturing one flow's log lines leaves the rest as it was)."""
    with logging_restored():
        configure_logging(settings, log_file)
        yield


@contextmanager
def logging_restored() -> Iterator[None]:
    """Whatever configures logging inside the block (a command run in-process by a
    test, say), the configuration from before comes back afterwards."""
    previous_structlog = structlog.get_config()
    root = logging.getLogger()
    previous_level, previous_handlers = root.level, list(root.handlers)
    previous_factory = logging.getLogRecordFactory()
    # basicConfig(force=True) would close the handlers it replaces; keep them open.
    root.handlers = []
    try:
        yield
    finally:
        ours = structlog.get_config()["logger_factory"]
        structlog.configure(**previous_structlog)
        if isinstance(ours, _FileLoggerFactory):
            ours.close()
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        root.handlers = previous_handlers
        root.setLevel(previous_level)
        logging.setLogRecordFactory(previous_factory)


class _FileLoggerFactory:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.stream = path.open("a", buffering=1, encoding="utf-8")  # line-buffered; closed at exit
        path.chmod(0o600)

    def __call__(self, *_: Any) -> structlog.PrintLogger:
        return structlog.PrintLogger(self.stream)

    def close(self) -> None:
        self.stream.close()
