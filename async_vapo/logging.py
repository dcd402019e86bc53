"""structlog set-up: human-readable on a terminal, JSON lines when asked (ASYNC_VAPO_LOG_JSON=1)."""

from __future__ import annotations

import logging
import os
import sys

import structlog


class _Stderr:
    """Whatever ``sys.stderr`` is at write time (not at configure time: test capture, redirection)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(json: bool | None = None, level: str | None = None) -> None:
    json = os.environ.get("ASYNC_VAPO_LOG_JSON", "0") == "1" if json is None else json
    lvl = getattr(logging, (level or os.environ.get("ASYNC_VAPO_LOG_LEVEL", "INFO")).upper(), logging.INFO)
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso" if json else "%H:%M:%S"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
