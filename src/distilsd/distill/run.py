"""Running a training config: one run, or each stage of a multi-stage recipe.

Picks the trainer for the config's component (the U-Net :class:`~distilsd.distill.trainer.Trainer`
or :func:`~distilsd.distill.vae.train_vae`); both write the run folder described in
:mod:`distilsd.distill.run_folder`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from . import checkpoint as ckpt
from .config import TrainConfig, save_config
from .run_folder import RunSummary

logger = logging.getLogger(__name__)


def run_training(config: TrainConfig) -> RunSummary:
    """Run one training (or each stage of a multi-stage recipe, each from the last one's student)."""
    from .config import stage_configs

    stages = stage_configs(config)
    if len(stages) == 1 and not config.stages:
        return _run_one(config)
    run_dir = Path(config.output_dir)
    summary = None
    previous: Path | None = None
    for i, stage in enumerate(stages):
        stage.output_dir = str(run_dir / "stages" / f"{i + 1:02d}-{stage.name}")
        if previous is not None:
            # Continue from the trained (not averaged) weights of the previous stage.
            stage.student = str(previous / ("unet_raw" if (previous / "unet_raw").is_dir() else "unet"))
            stage.arch = None
            stage.init = "teacher"
        stage_dir = Path(stage.output_dir)
        if (stage_dir / "distill_info.json").is_file():
            logger.info("stage %s is finished; skipping it", stage.name)
            previous = stage_dir
            continue
        stage.resume = "latest" if config.resume and ckpt.list_checkpoints(stage_dir) else None
        stage.overwrite = stage.overwrite or (stage_dir.exists() and not stage.resume)
        summary = _run_one(stage)
        previous = stage_dir
    # The run folder itself is the last stage's pipeline.
    for item in previous.iterdir():
        if item.name in ("checkpoints", "logs", "validation", "config.yaml") or item.name.startswith("."):
            continue
        target = run_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        if item.is_dir():
            shutil.copytree(item, target)
        else:
            shutil.copy2(item, target)
    save_config(config, run_dir / "config.yaml")
    return summary or RunSummary(run_dir, stages[-1].max_steps)


def _run_one(config: TrainConfig) -> RunSummary:
    if config.component in ("vae", "tiny-vae"):
        from .vae import train_vae

        return train_vae(config)
    from .trainer import Trainer

    trainer = Trainer(config)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()
