"""Logging for c2f: library code logs to the ``c2f`` logger; the command line decides where it goes.

Library modules call ``logging.getLogger(__name__)`` (children of ``c2f``) and never print. Without
``setup`` the records follow Python's defaults (warnings and errors reach stderr, nothing else), as in
any library. ``setup`` (called by the CLI) sends them to stderr through ``tqdm.write``, so progress
bars are not torn by a log line, and optionally to a file with timestamps.
"""
from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

ROOT = "c2f"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TqdmHandler(logging.Handler):
    """Writes records between progress-bar refreshes instead of through them.

    Without a ``stream``, writes to whatever ``sys.stderr`` is at the time of the record.
    """

    def __init__(self, stream=None):
        super().__init__()
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self._stream or sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


class _ConsoleFormatter(logging.Formatter):
    """Plain messages for INFO, the level named for the rest (``warning: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


def level_for(quiet: bool = False, verbose: bool = False) -> int:
    if quiet and verbose:
        raise ValueError("--quiet and --verbose cannot be combined")
    return logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO


def setup(level: int = logging.INFO, log_file: str | None = None, stream=None) -> logging.Logger:
    """Configures the ``c2f`` logger: console (stderr) at ``level``, and ``log_file`` at DEBUG if given.

    Replaces the handlers an earlier call installed, so it can be called once per command.
    """
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if getattr(h, "_c2f", False)]:
        logger.removeHandler(handler)
        handler.close()
    console = TqdmHandler(stream)
    console.setLevel(level)
    console.setFormatter(_ConsoleFormatter("%(message)s"))
    console._c2f = True
    logger.addHandler(console)
    file_level = level
    if log_file:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
        handler._c2f = True
        logger.addHandler(handler)
        file_level = logging.DEBUG
    logger.setLevel(min(level, file_level))
    logger.propagate = False
    return logger
