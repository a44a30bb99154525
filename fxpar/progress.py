"""Progress of long stages (capture, ILP build, solve) as log records of the ``fxpar`` logger.

Silent by default, as a library should be; ``fxpar plan`` (the console script) shows them on
stderr, and a user turns them on with ``logging.getLogger("fxpar").setLevel(logging.INFO)`` plus a
handler (or ``logging.basicConfig(level=logging.INFO)``). A stage that runs longer than
``every_s`` logs how long it has been running, every ``every_s`` seconds, from a daemon thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

logger = logging.getLogger("fxpar")

__all__ = ["logger", "show_progress", "stage"]


@contextlib.contextmanager
def stage(what: str, *, every_s: float = 10.0, limit_s: float | None = None) -> Iterator[None]:
    """Log ``what ...`` at the start, ``... still running`` while it runs, ``done in X s`` at the end."""
    if not logger.isEnabledFor(logging.INFO):
        yield
        return
    start = time.perf_counter()
    done = threading.Event()
    logger.info("%s ...", what)

    def beat() -> None:
        while not done.wait(every_s):
            limit = f" (limit {limit_s:g} s)" if limit_s is not None else ""
            logger.info("%s: %.0f s so far%s", what, time.perf_counter() - start, limit)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    logger.info("%s: done in %.2f s", what, time.perf_counter() - start)


@contextlib.contextmanager
def show_progress(stream=None) -> Iterator[None]:
    """While in the block, send the ``fxpar`` logger's progress records to ``stream`` (stderr),
    ``fxpar: ...`` per line; the logger is as it was afterwards."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("fxpar: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
