"""The run-folder contract shared by the U-Net trainer and the VAE trainer.

What a training run returns (:class:`RunSummary`), which base components are copied into the
output pipeline, and loading a base component with one clear error. Running a config (and
choosing the trainer) is :mod:`distilsd.distill.run`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Pipeline components copied unchanged from the base model into the output pipeline.
COPIED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler", "safety_checker", "feature_extractor")


@dataclass
class RunSummary:
    """What a finished run reports: where it is, how far it got, and its logged losses."""

    output_dir: Path
    steps: int
    skipped_steps: int = 0
    bad_samples: int = 0
    samples_per_second: float = 0.0
    cache_build_s: float = 0.0
    is_main_process: bool = True
    losses: list[dict[str, float]] = field(default_factory=list)
