"""Knowledge distillation (and plain training) of Stable Diffusion U-Nets.

- :class:`TrainConfig` / :func:`load_config`: the typed config (YAML + ``key=value`` overrides);
- :func:`run_training` (:mod:`.run`): run a config, or each stage of a recipe;
- :class:`Trainer`: the accelerate-based U-Net trainer (one CPU to many GPUs); :mod:`.vae` the VAE's;
- :mod:`.data`, :mod:`.cache`, :mod:`.losses`, :mod:`.checkpoint`, :mod:`.run_folder`: their parts.

Importing this package is cheap; torch and diffusers load when a trainer is built.
"""

from distilsd.distill.config import TrainConfig, load_config, parse_overrides

__all__ = ["TrainConfig", "Trainer", "load_config", "parse_overrides", "run_training"]


def __getattr__(name: str):
    if name == "Trainer":
        from distilsd.distill.trainer import Trainer

        return Trainer
    if name == "run_training":
        from distilsd.distill.run import run_training

        return run_training
    raise AttributeError(name)
