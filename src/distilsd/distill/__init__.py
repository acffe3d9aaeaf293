"""Knowledge distillation (and plain training) of Stable Diffusion U-Nets.

- :class:`TrainConfig` / :func:`load_config`: the typed config (YAML + ``key=value`` overrides);
- :class:`Trainer` / :func:`run_training`: the accelerate-based trainer (one CPU to many GPUs);
- :mod:`.data`, :mod:`.cache`, :mod:`.losses`, :mod:`.checkpoint`: its parts.

Importing this package is cheap; torch and diffusers load when a trainer is built.
"""

from distilsd.distill.config import TrainConfig, load_config, parse_overrides

__all__ = ["TrainConfig", "Trainer", "load_config", "parse_overrides", "run_training"]


def __getattr__(name: str):
    if name in ("Trainer", "run_training"):
        from distilsd.distill import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
