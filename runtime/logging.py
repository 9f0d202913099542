"""structlog configuration: JSON lines to stderr, context from contextvars.

Log event ids, references, agencies and counts; never names, addresses, dates
of birth or national insurance numbers.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

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
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_stderr_logger if log_file is None else _file_logger(log_file),
        cache_logger_on_first_use=False,
    )
    # aiokafka logs through the standard library; keep its noise at WARNING.
    handler: logging.Handler = (
        logging.StreamHandler(sys.stderr) if log_file is None else logging.FileHandler(log_file)
    )
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)


def _file_logger(path: Path) -> Callable[..., structlog.PrintLogger]:
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = path.open("a", buffering=1, encoding="utf-8")  # line-buffered; closed at exit
    path.chmod(0o600)

    def factory(*_: Any) -> structlog.PrintLogger:
        return structlog.PrintLogger(stream)

    return factory
