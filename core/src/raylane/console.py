"""What the user sees on the driver: rank 0's console, as if training ran in the driver's own terminal.

Rank 0's ``sys.stdout`` (Lightning's progress bar, the user's prints) and Lightning's log messages travel through the
metric relay and are written on the driver unchanged, so there is one progress bar and no ``(pid=...)`` prefixes. Other
ranks keep only warnings and errors, which reach the driver through Ray's log streaming prefixed with their rank.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from raylane import relay

STDOUT = "raylane.stdout"
LOG_RECORD = "raylane.log"
LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")


class RelayStream:
    """A text stream whose writes go to the driver's stdout."""

    def __init__(self, original: TextIO) -> None:
        self._original = original

    def write(self, text: str) -> int:
        if text:
            relay.send(STDOUT, text)
        return len(text)

    def flush(self) -> None:
        """Nothing buffered here: the relay batches."""

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


class RelayLogHandler(logging.Handler):
    """Sends Lightning's log messages to the driver, which logs them through its own Lightning loggers."""

    def emit(self, record: logging.LogRecord) -> None:
        relay.send(LOG_RECORD, (record.name, record.levelno, self.format(record)))


@contextmanager
def worker_console(global_rank: int) -> Iterator[None]:
    """Route rank 0's console to the driver; quiet the other ranks down to warnings."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    saved = [(logger, logger.level, logger.handlers[:], logger.propagate) for logger in loggers]
    original_stdout = sys.stdout
    try:
        if global_rank == 0:
            sys.stdout = RelayStream(original_stdout)  # type: ignore[assignment]
            handler = RelayLogHandler()
            for logger in loggers:
                logger.handlers = [handler]
                logger.propagate = False
        else:
            for logger in loggers:
                logger.setLevel(logging.WARNING)
        yield
    finally:
        sys.stdout = original_stdout
        for logger, level, handlers, propagate in saved:
            logger.setLevel(level)
            logger.handlers = handlers
            logger.propagate = propagate


def show(topic: str, payload: Any) -> bool:
    """Driver side: print or log one relayed console message. False when ``topic`` is not a console topic."""
    if topic == STDOUT:
        sys.stdout.write(payload)
        sys.stdout.flush()
        return True
    if topic == LOG_RECORD:
        name, level, message = payload
        logging.getLogger(name).log(level, message)
        return True
    return False


def terminal_env() -> dict[str, str]:
    """The driver terminal's size, so rank 0's progress bar is drawn for the screen it ends up on."""
    size = shutil.get_terminal_size()
    return {"COLUMNS": os.environ.get("COLUMNS", str(size.columns)), "LINES": os.environ.get("LINES", str(size.lines))}
