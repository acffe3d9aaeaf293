"""distilsd.logging_utils: one stderr handler on the `distilsd` logger, the level switch; no prints."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

import distilsd
from distilsd import logging_utils
from distilsd.errors import InputError

SRC = Path(distilsd.__file__).parent


@pytest.fixture
def library_logging():
    """Restore the `distilsd` logger's level, handlers and propagation after the test."""
    root = logging.getLogger("distilsd")
    saved = (root.level, list(root.handlers), root.propagate)
    yield root
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    root.propagate = saved[2]


def test_warnings_are_prefixed_and_info_follows_the_level(library_logging, capsys):
    logger = logging.getLogger("distilsd.some.module")
    logging_utils.set_verbosity("warning")
    logger.warning("the safety checker flagged %s", "a.png")
    logger.info("hidden at warning")
    assert capsys.readouterr().err == "warning: the safety checker flagged a.png\n"

    logging_utils.set_verbosity(logging.INFO)
    assert logging_utils.get_verbosity() == logging.INFO
    logger.info("rank %d/%d: %d made", 0, 1, 3)
    logger.debug("hidden at info")
    assert capsys.readouterr().err == "rank 0/1: 3 made\n"

    logging_utils.set_verbosity("DEBUG")
    logger.debug("shown")
    assert capsys.readouterr().err == "debug: shown\n"


def test_records_reach_the_root_logger_only_when_asked(library_logging, capsys):
    """An application's own handlers would print every line twice; it opts in instead."""
    reached_root = []

    class Collect(logging.Handler):
        def emit(self, record):
            reached_root.append(record.getMessage())

    handler = Collect()
    logging.getLogger().addHandler(handler)
    try:
        logger = logging.getLogger("distilsd.some.module")
        logger.warning("once")
        assert reached_root == [] and capsys.readouterr().err == "warning: once\n"

        logging_utils.enable_propagation()
        logging_utils.disable_default_handler()
        logger.warning("routed")
        assert reached_root == ["routed"] and capsys.readouterr().err == ""
    finally:
        logging.getLogger().removeHandler(handler)


def test_level_names(monkeypatch):
    assert logging_utils.parse_level(" Info ") == logging.INFO
    monkeypatch.setenv("DISTILSD_LOG_LEVEL", "")
    assert logging_utils.level_from_env(default=logging.INFO) == logging.INFO
    monkeypatch.setenv("DISTILSD_LOG_LEVEL", "error")
    assert logging_utils.level_from_env() == logging.ERROR
    monkeypatch.setenv("DISTILSD_LOG_LEVEL", "loud")
    with pytest.raises(InputError, match="not a log level"):
        logging_utils.level_from_env()


@pytest.mark.parametrize(
    ("env", "flags", "level"),
    [
        (None, [], logging.INFO),
        (None, ["-v"], logging.DEBUG),
        ("warning", [], logging.WARNING),
        ("warning", ["--verbose"], logging.DEBUG),
    ],
)
def test_cli_level_from_flag_and_environment(env, flags, level, library_logging, run_cli, monkeypatch):
    if env is None:
        monkeypatch.delenv("DISTILSD_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("DISTILSD_LOG_LEVEL", env)
    code, out, err = run_cli([*flags, "schedulers"])
    assert code == 0 and "pndm" in out and err == ""
    assert logging_utils.get_verbosity() == level


def test_cli_refuses_an_unknown_level(library_logging, expect_cli_error, monkeypatch):
    monkeypatch.setenv("DISTILSD_LOG_LEVEL", "loud")
    expect_cli_error(["schedulers"], "DISTILSD_LOG_LEVEL='loud' is not a log level", "debug, info")


def test_library_code_never_prints():
    """Library code logs (or raises); only the command line (``cli/``, ``__main__.py``) writes to the terminal.

    tests/test_layout.py checks the other half: library code never imports the CLI.
    """
    prints = []
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC).as_posix()
        if relative.startswith("cli/") or relative == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                prints.append(f"{relative}:{node.lineno}")
    assert not prints, prints
