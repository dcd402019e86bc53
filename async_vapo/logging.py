"""structlog set-up: human-readable on a terminal, JSON lines when asked (ASYNC_VAPO_LOG_JSON=1).

A launched run also keeps one log file per process, ``<output_dir>/logs/<process>.log`` (the launcher
sets ``ASYNC_VAPO_LOG_DIR`` for its children): every structlog event as a JSON line, the standard
``logging`` records (vLLM's and transformers', at the level they are emitted), uncaught exceptions and,
for a fatal signal, every thread's stack (``faulthandler``). The console keeps its own rendering.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import IO, Any

import structlog

LOG_DIR_ENV = "ASYNC_VAPO_LOG_DIR"


class _Stderr:
    """Whatever ``sys.stderr`` is at write time (not at configure time: test capture, redirection)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _AlsoToFile:
    """structlog's last processor: each event as a JSON line to the process's log file, then the
    console rendering (what the logger prints)."""

    def __init__(self, console: Any, file: IO[str]) -> None:
        self.console, self.file = console, file
        self.json = structlog.processors.JSONRenderer()

    def __call__(self, logger: Any, name: str, event: dict[str, Any]) -> str:
        with contextlib.suppress(OSError, ValueError):  # a full disk or a closed file never stops the process
            self.file.write(str(self.json(logger, name, dict(event))) + "\n")
        return str(self.console(logger, name, event))


_FILE_HANDLER_NAME = "async_vapo.file"


def log_file(process: str) -> Path | None:
    """This process's log file when the launcher asked for files (``ASYNC_VAPO_LOG_DIR``), else None."""
    d = os.environ.get(LOG_DIR_ENV)
    return Path(d) / f"{process}.log" if d else None


def configure_logging(json: bool | None = None, level: str | None = None, process: str | None = None) -> None:
    """The console logger, and the log file of ``process`` when the launcher asked for files."""
    json = os.environ.get("ASYNC_VAPO_LOG_JSON", "0") == "1" if json is None else json
    lvl = getattr(logging, (level or os.environ.get("ASYNC_VAPO_LOG_LEVEL", "INFO")).upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    path = log_file(process) if process else None
    if path is not None:
        renderer = _AlsoToFile(renderer, _open_log(path))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso" if json or path else "%H:%M:%S"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def _open_log(path: Path) -> IO[str]:
    """Open (append) the process's log file and route the standard logging records, uncaught exceptions
    and fatal-signal stacks into it too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (lives as long as the process)
    handler = logging.StreamHandler(f)
    handler.set_name(_FILE_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # vLLM's logger does not propagate to the root: it gets the handler of its own
    for logger in (logging.getLogger(), logging.getLogger("vllm")):
        for old in [h for h in logger.handlers if h.get_name() == _FILE_HANDLER_NAME]:
            logger.removeHandler(old)
        logger.addHandler(handler)
    previous = sys.excepthook

    def hook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        with contextlib.suppress(OSError, ValueError):
            f.write("".join(traceback.format_exception(kind, exc, tb)))
        previous(kind, exc, tb)

    sys.excepthook = hook
    faulthandler.enable(file=f, all_threads=True)
    return f
