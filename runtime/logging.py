"""structlog configuration: JSON lines to stderr, context from contextvars.

Log event ids, references, agencies and counts; never names, addresses, dates
of birth or national insurance numbers.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from runtime.settings import Settings


def _stderr_logger(*_: Any) -> structlog.PrintLogger:
    # Look sys.stderr up per logger, not once: test runners and CLI harnesses swap
    # and close it, and a logger holding a closed stream would crash its component.
    return structlog.PrintLogger(sys.stderr)


def configure_logging(settings: Settings) -> None:
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
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    # aiokafka logs through the standard library; keep its noise at WARNING.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
