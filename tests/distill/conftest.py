"""Fixtures for the trainer tests: a tiny teacher (session fixture in tests/conftest.py) and a
folder of 16 synthetic 64 px images with captions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    from distilsd.distill.samples import write_shapes_folder

    return write_shapes_folder(tmp_path_factory.mktemp("shapes") / "data", num_images=16, size=64)


def tiny_run_overrides(
    teacher: Path | None, data_dir: Path, output_dir: Path, **overrides: Any
) -> dict[str, Any]:
    """Dotted config overrides for a fast run on the tiny models (64 px, batch 2, no grids).

    ``overrides`` are config keys; a dict value for a section (``data={...}``) sets its fields.
    """
    values: dict[str, Any] = {
        "output_dir": str(output_dir),
        "data.source": str(data_dir),
        "data.resolution": 64,
        "data.cache_dir": str(output_dir.parent / "latent-cache"),
        "train_batch_size": 2,
        "max_steps": 4,
        "optim.learning_rate": 1e-3,
        "checkpoint_every": 0,
        "validation.prompts": [],
        "progress_bar": False,
        "log_with": ["csv"],
    }
    if teacher is not None:
        values.update(teacher=str(teacher), arch="bk-tiny")
    for key, value in overrides.items():
        if isinstance(value, dict):
            values.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            values[key] = value
    return values


def read_csv(path: Path) -> list[dict[str, float]]:
    import csv

    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
