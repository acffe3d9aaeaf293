"""The ``distilsd`` command line: a thin layer over the Python API.

Each sub-command lives in its own module and is imported only when it runs, so that
``distilsd --help`` does not pay for torch and diffusers. Known errors
(:class:`distilsd.errors.DistilSDError`) become one line on stderr and a non-zero exit;
set ``DISTILSD_DEBUG=1`` to see the traceback instead. Log lines go to stderr at the info
level (``-v``: debug; or ``DISTILSD_LOG_LEVEL``), results to stdout.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from distilsd import __version__
from distilsd.logging_utils import level_from_env, set_verbosity

# name -> (module, attribute, one-line help). The help is repeated here so that
# `distilsd --help` can list the commands without importing them.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "generate": (
        "distilsd.cli.generate",
        "generate_command",
        "Generate images from text (or an init image) with any SD-family model.",
    ),
    "schedulers": (
        "distilsd.cli.generate",
        "schedulers_command",
        "List the schedulers `generate --scheduler` accepts.",
    ),
    "eval": (
        "distilsd.cli.evaluate",
        "eval_group",
        "Evaluate with the BK-SDM protocol: generate, score (FID/IS/CLIP), sweep guidance.",
    ),
    "bench": (
        "distilsd.cli.bench",
        "bench_command",
        "Benchmark speed and memory of models, dtypes and backends (per component).",
    ),
    "distill": (
        "distilsd.cli.distill",
        "distill_command",
        "Distill a teacher into a block-removed student (task + output + feature KD).",
    ),
    "train": ("distilsd.cli.distill", "train_command", "Train or fine-tune an SD U-Net without a teacher."),
    "bench-train": (
        "distilsd.cli.distill",
        "bench_train_command",
        "Training throughput (samples/s) with and without the latent cache.",
    ),
    "dreambooth": (
        "distilsd.cli.lora",
        "dreambooth_command",
        "Teach a model a subject from a few images (LoRA or full DreamBooth, prior preservation).",
    ),
    "lora": (
        "distilsd.cli.lora",
        "lora_group",
        "LoRA files: `lora transfer` carries a teacher's LoRA over to its compressed student.",
    ),
    "compress": (
        "distilsd.cli.compress",
        "compress_command",
        "Build a BK-SDM-style student U-Net (bk-base/small/tiny or custom) from a teacher.",
    ),
    "arch": (
        "distilsd.cli.compress",
        "arch_command",
        "Parameters, MACs and per-block breakdown of a teacher and its students.",
    ),
    "shapes": (
        "distilsd.cli.shapes",
        "shapes_group",
        "The Shapes world: make data, train and check the judge, score models.",
    ),
    "export": (
        "distilsd.cli.export",
        "export_command",
        "Export a model to OpenVINO IR or ONNX (fp32/bf16/int8) for fast CPU generation.",
    ),
    "convert": (
        "distilsd.cli.convert",
        "convert_command",
        "Convert a diffusers SD 1.x/2.x pipeline folder into one original-layout .safetensors checkpoint.",
    ),
    "serve": (
        "distilsd.cli.serve",
        "serve_command",
        "Serve a web UI and a JSON API (own + AUTOMATIC1111-compatible) for one or more models.",
    ),
    "serve-loadtest": (
        "distilsd.cli.serve",
        "loadtest_command",
        "Load-test a fresh `distilsd serve` on 127.0.0.1: throughput, latency, statuses, memory.",
    ),
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, attribute, _ = COMMANDS[cmd_name]
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(
    cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="distilsd")
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Show debug log lines too (or set DISTILSD_LOG_LEVEL to debug, info, warning or error).",
)
def cli(verbose: bool) -> None:
    """distilsd: make Stable Diffusion small and fast.

    Generate with any SD 1.x/2.x model, compress it into a BK-SDM-style student,
    distill, evaluate, deploy and serve it.
    """
    # The command shows progress lines (info) that the Python API keeps quiet by default.
    set_verbosity(logging.DEBUG if verbose else level_from_env(default=logging.INFO))


def report_error(message: str, hint: str | None = None, exit_code: int = 2) -> None:
    """Print one line (and a hint) on stderr and exit."""
    click.secho(f"error: {message}", err=True, fg="red")
    if hint:
        click.echo(f"hint: {hint}", err=True)
    sys.exit(exit_code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``distilsd`` command."""
    from distilsd.errors import DistilSDError

    debug = os.environ.get("DISTILSD_DEBUG", "") not in ("", "0")
    try:
        cli.main(args=argv, prog_name="distilsd", standalone_mode=False)
    except click.exceptions.Abort:
        report_error("interrupted", exit_code=130)
    except KeyboardInterrupt:
        report_error(
            "interrupted; finished outputs were kept, the unfinished one was not written", exit_code=130
        )
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except DistilSDError as exc:
        if debug:
            raise
        report_error(exc.message, exc.hint, exc.exit_code)
    except OSError as exc:
        # Disk full, permission denied and the like, raised outside our own checks.
        if debug:
            raise
        report_error(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc), exit_code=1)
