"""The command line as a whole: every command has help, `distilsd --help` stays fast, shared options."""

import subprocess
import sys

import click
from click.testing import CliRunner

from distilsd.cli import COMMANDS, cli


def test_every_command_has_help():
    runner = CliRunner()
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output
        sub = runner.invoke(cli, [name, "--help"])
        assert sub.exit_code == 0, (name, sub.output)
        assert "Usage:" in sub.output


def test_help_does_not_import_torch():
    # `distilsd --help` must stay fast: the heavy stages are imported lazily.
    code = "import sys; from distilsd.cli import main\ntry:\n main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def _all_commands():
    import importlib

    for module_name, attribute, _ in COMMANDS.values():
        command = getattr(importlib.import_module(module_name), attribute)
        yield from command.commands.values() if isinstance(command, click.Group) else [command]


def test_device_and_dtype_take_the_shared_choices():
    # Declared once in distilsd.cli.options: no command may take a free-text --device or a
    # choice list of its own (bench's repeatable --dtype is checked against DTYPES when it runs).
    from distilsd.models import DEVICES, DTYPES

    seen = 0
    for command in _all_commands():
        for param in command.params:
            if param.name in ("device", "dtype"):
                seen += 1
                assert isinstance(param.type, click.Choice), (command.name, param.name)
                choices = tuple(param.type.choices)
                if param.name == "dtype" and choices[0] == "auto":  # dtype_option(auto=True)
                    choices = choices[1:]
                assert choices == (DEVICES if param.name == "device" else DTYPES)
    assert seen >= 9
