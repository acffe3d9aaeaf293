"""Options that several commands share, declared once.

Each factory returns a click decorator; a command may reword the help (what the option
means there) but not the flag name, its type or its choices. Only stdlib-light modules
are imported here, so that ``distilsd --help`` stays free of torch and diffusers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import click

from distilsd.models import DEVICES, DTYPES, PICKLE_SUFFIXES

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class FiniteFloat(click.FloatRange):
    """A float flag that refuses nan and inf (float() takes them, and they make black images)."""

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:
        return "" if self.min is None and self.max is None else super()._describe_range()

    def get_metavar(self, param, ctx=None) -> str:
        return "FLOAT" if self.min is None and self.max is None else "FLOAT RANGE"


FINITE_FLOAT = FiniteFloat()


class Seed(click.ParamType):
    """A generator seed: a whole number the API takes too (0 .. MAX_SEED)."""

    name = "integer"

    def convert(self, value, param, ctx):
        from distilsd.generate.prompts import MAX_SEED

        number = click.INT.convert(value, param, ctx)
        if not 0 <= number <= MAX_SEED:
            self.fail(f"{number} is not a seed between 0 and {MAX_SEED}", param, ctx)
        return number


SEED = Seed()


def device_option(help: str = "auto = cuda, then mps, then cpu.") -> Decorator:
    return click.option("--device", type=click.Choice(DEVICES), default="auto", help=help)


def dtype_option(
    help: str = "Weights and compute precision.", default: str | None = "fp32", auto: bool = False
) -> Decorator:
    """``--dtype`` with the shared choices; ``auto=True`` adds ``auto`` (the command picks per device)."""
    choices = ("auto", *DTYPES) if auto else DTYPES
    return click.option("--dtype", type=click.Choice(choices), default=default, help=help)


def allow_pickle_option(
    help: str = f"Allow pickled checkpoints ({'/'.join(PICKLE_SUFFIXES)}). Unpickling can run code: "
    "only for files you trust.",
) -> Decorator:
    return click.option("--allow-pickle", is_flag=True, help=help)


def overwrite_option(help: str = "Replace an existing folder.") -> Decorator:
    return click.option("--overwrite", is_flag=True, help=help)


def steps_option(help: str) -> Decorator:
    """``--steps`` that defaults to None: the command picks 25, or an LCM model's own steps."""
    return click.option(
        "--steps", "num_inference_steps", default=None, type=int, show_default=False, help=help
    )


def guidance_option(help: str) -> Decorator:
    """``-g/--guidance`` that defaults to None: the command picks the model's guidance."""
    return click.option(
        "-g", "--guidance", "guidance_scale", default=None, type=FINITE_FLOAT, show_default=False, help=help
    )


def seed_option(default: int | None = 0, help: str | None = None) -> Decorator:
    return click.option("--seed", default=default, type=SEED, help=help)


def lora_option(
    help: str = "Apply a LoRA (diffusers or kohya/A1111 .safetensors, or a run folder) at SCALE (default 1); repeat to mix several.",
) -> Decorator:
    return click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]", help=help)


def lora_skip_unknown_option(
    help: str = "Load the modules of a LoRA that this model has and skip the rest (default: refuse).",
) -> Decorator:
    return click.option("--lora-skip-unknown", is_flag=True, help=help)
