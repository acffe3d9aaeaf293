"""Options that several commands share, declared once.

Each factory returns a click decorator; a command may reword the help (what the option
means there) but not the flag name, its type or its choices. Only stdlib-light modules
are imported here, so that ``distilsd --help`` stays free of torch and diffusers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from distilsd.models import DEVICES, DTYPES, PICKLE_SUFFIXES

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def device_option(help: str = "auto = cuda, then mps, then cpu.") -> Decorator:
    return click.option("--device", type=click.Choice(DEVICES), default="auto", help=help)


def dtype_option(help: str = "Weights and compute precision.", default: str | None = "fp32") -> Decorator:
    return click.option("--dtype", type=click.Choice(DTYPES), default=default, help=help)


def allow_pickle_option(
    help: str = f"Allow pickled checkpoints ({'/'.join(PICKLE_SUFFIXES)}). Unpickling can run code: "
    "only for files you trust.",
) -> Decorator:
    return click.option("--allow-pickle", is_flag=True, help=help)


def overwrite_option(help: str = "Replace an existing folder.") -> Decorator:
    return click.option("--overwrite", is_flag=True, help=help)


def seed_option(default: int | None = 0, help: str | None = None) -> Decorator:
    return click.option("--seed", default=default, type=int, help=help)


def lora_option(
    help: str = "Apply a LoRA (diffusers or kohya/A1111 .safetensors, or a run folder) at SCALE (default 1); repeat to mix several.",
) -> Decorator:
    return click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]", help=help)
