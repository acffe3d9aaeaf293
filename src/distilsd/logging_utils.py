"""distilsd's logging: one ``distilsd`` logger tree, one stderr handler, one verbosity switch.

Library modules log through ``logging.getLogger(__name__)`` and never print; their loggers sit
under the ``distilsd`` logger, which :mod:`distilsd` configures on import (as
``diffusers.utils.logging`` does for ``diffusers``, in small): one handler on stderr that shows
warnings as ``warning: ...`` lines and info as the bare message, and no propagation to the root
logger, so an application's own logging setup does not print every line twice.

The level is ``DISTILSD_LOG_LEVEL`` (debug, info, warning, error) if set, else warning for the
Python API; the ``distilsd`` command shows info by default and debug with ``-v``. Progress bars
are tqdm's, not log lines.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from distilsd.errors import InputError

LIBRARY_NAME = "distilsd"
LEVEL_ENV = "DISTILSD_LOG_LEVEL"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
DEFAULT_LEVEL = logging.WARNING
# Warnings and errors read like the CLI's own `error: ...` lines; info is the bare message.
PREFIXES = {logging.DEBUG: "debug: ", logging.WARNING: "warning: ", logging.ERROR: "error: "}

_lock = threading.Lock()
_default_handler: logging.Handler | None = None


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record arrives, not when the handler was made.

    Test runners, click's CliRunner and tqdm replace ``sys.stderr``; the lines must follow.
    """

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = PREFIXES.get(record.levelno, "error: " if record.levelno > logging.ERROR else "")
        return prefix + super().format(record)


def parse_level(name: str) -> int:
    """The logging level of a name (``debug``, ``info``, ``warning``, ``error``; any case)."""
    level = LEVELS.get(name.strip().lower())
    if level is None:
        raise InputError(f"{LEVEL_ENV}={name!r} is not a log level", hint=f"use one of: {', '.join(LEVELS)}")
    return level


def level_from_env(default: int = DEFAULT_LEVEL) -> int:
    """The level ``DISTILSD_LOG_LEVEL`` asks for, or ``default`` when it is unset or empty."""
    name = os.environ.get(LEVEL_ENV, "")
    return parse_level(name) if name.strip() else default


def _library_root_logger() -> logging.Logger:
    return logging.getLogger(LIBRARY_NAME)


def configure_library_root_logger() -> None:
    """Give the ``distilsd`` logger its stderr handler and level (idempotent; ``import distilsd`` calls it)."""
    global _default_handler
    with _lock:
        if _default_handler is not None:
            return
        _default_handler = _StderrHandler()
        _default_handler.setFormatter(_Formatter("%(message)s"))
        root = _library_root_logger()
        root.addHandler(_default_handler)
        try:
            root.setLevel(level_from_env())
        except InputError:  # a bad value must not break `import distilsd`; the CLI reports it
            root.setLevel(DEFAULT_LEVEL)
        root.propagate = False


def set_verbosity(level: int | str) -> None:
    """Show distilsd's log records of ``level`` and above (a ``logging`` level or its name)."""
    configure_library_root_logger()
    _library_root_logger().setLevel(parse_level(level) if isinstance(level, str) else level)


def get_verbosity() -> int:
    """The level distilsd's loggers show (``logging.WARNING`` unless set)."""
    configure_library_root_logger()
    return _library_root_logger().getEffectiveLevel()


def disable_default_handler() -> None:
    """Remove distilsd's stderr handler, for applications that route the records themselves."""
    configure_library_root_logger()
    _library_root_logger().removeHandler(_default_handler)


def enable_propagation() -> None:
    """Pass distilsd's records on to the root logger too (``caplog``, an application's handlers)."""
    configure_library_root_logger()
    _library_root_logger().propagate = True


def quiet_libraries() -> None:
    """Keep diffusers' and transformers' own logs and loading bars off the terminal.

    distilsd shows its own progress; their per-component bars and info logs are noise.
    """
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
