"""``compress()``: teacher in, student U-Net (or whole pipeline) folder out.

Every check that needs no weights runs first (output folder, teacher config, layout), the
student is built and saved into a temporary folder next to the output, and only a complete
result is renamed into place. ``distilsd_compress.json`` beside the student's weights
records the teacher, the layout and which teacher tensor went to which student tensor.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distilsd.compress.build import INIT_MODES, build_student, student_config, tensor_mapping
from distilsd.compress.layouts import StudentLayout, get_layout
from distilsd.compress.teacher import TeacherSource, empty_unet, load_teacher_unet, resolve_teacher
from distilsd.errors import InputError, OutputError

logger = logging.getLogger(__name__)

RECORD_FILENAME = "distilsd_compress.json"


@dataclass
class CompressResult:
    """What :func:`compress` built (or, for a dry run, would build)."""

    teacher: TeacherSource
    layout: StudentLayout
    init: str
    mapping: dict[str, str]
    student_config: dict[str, Any]
    teacher_params: int
    student_params: int
    output_dir: Path | None = None
    unet_dir: Path | None = None
    pipeline: bool = False
    dry_run: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The content of distilsd_compress.json."""
        from distilsd import __version__

        return {
            "distilsd_version": __version__,
            "teacher": self.teacher.to_dict(),
            "arch": self.layout.name,
            "layout": self.layout.to_dict(),
            "init": self.init,
            "teacher_params": self.teacher_params,
            "student_params": self.student_params,
            "removed_blocks": self.layout.removed_modules,
            "feature_pairs": [list(pair) for pair in self.layout.feature_pairs],
            # student tensor -> teacher tensor it was copied from (empty for random init)
            "mapping": self.mapping,
            **self.extra,
        }


def _check_output_dir(output_dir: Path, overwrite: bool, teacher: TeacherSource | None = None) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(
            f"output {output_dir} exists and is not a folder", hint="choose another -o/--output"
        )
    if output_dir.exists() and not overwrite:
        raise OutputError(f"output folder {output_dir} already exists", hint="pass --overwrite to replace it")
    if teacher is not None:
        resolved = output_dir.resolve()
        for teacher_dir in (teacher.unet_dir, teacher.pipeline_dir):
            if teacher_dir is not None:
                teacher_resolved = teacher_dir.resolve()
                if resolved == teacher_resolved or resolved in teacher_resolved.parents:
                    raise OutputError(
                        f"output {output_dir} would replace the teacher in {teacher_dir}",
                        hint="choose another -o/--output",
                    )


def _copy_pipeline_components(pipeline_dir: Path, target: Path) -> None:
    """Copy every component of a pipeline folder except its U-Net, and its model_index.json."""
    index = json.loads((pipeline_dir / "model_index.json").read_text(encoding="utf-8"))
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(pipeline_dir / "model_index.json", target / "model_index.json")
    for name, value in index.items():
        if name.startswith("_") or name == "unet" or not isinstance(value, list):
            continue
        if (pipeline_dir / name).is_dir():
            shutil.copytree(pipeline_dir / name, target / name)


def _save_hub_pipeline(repo_id: str, student, target: Path, allow_pickle: bool) -> None:
    from diffusers import DiffusionPipeline

    from distilsd.errors import ModelLoadError

    try:
        pipe = DiffusionPipeline.from_pretrained(
            repo_id, unet=student, use_safetensors=None if allow_pickle else True
        )
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the pipeline components of '{repo_id}': {str(exc).splitlines()[0]}"
        ) from exc
    pipe.save_pretrained(target, safe_serialization=True)


def _move_into_place(tmp_dir: Path, output_dir: Path) -> None:
    """Rename the finished temporary folder to ``output_dir``, replacing an old one last."""
    old_dir = None
    if output_dir.exists():
        old_dir = output_dir.with_name(f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(output_dir, old_dir)
    os.replace(tmp_dir, output_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def compress(
    teacher: str | Path | TeacherSource,
    arch: str | Path | Mapping[str, Any] | StudentLayout,
    output_dir: str | Path | None = None,
    pipeline: bool = False,
    init: str = "teacher",
    overwrite: bool = False,
    dry_run: bool = False,
    allow_pickle: bool = False,
    seed: int | None = None,
) -> CompressResult:
    """Build a BK-SDM-style student from ``teacher`` and save it in diffusers format.

    Args:
        teacher: a pipeline folder, a U-Net folder, a hub id, or ``sd-v1``/``sd-v2``
            (architecture only: with ``init="random"`` or ``dry_run`` only).
        arch: a preset (``bk-base``, ``bk-small``, ``bk-tiny``, aliases), a YAML/JSON layout
            spec file, a spec mapping or a StudentLayout.
        output_dir: the folder to write (not needed for a dry run). Refused if it exists,
            unless ``overwrite``.
        pipeline: write a whole pipeline (the teacher's other components + the student
            U-Net in ``unet/``) instead of a U-Net folder.
        init: ``"teacher"`` (BK-SDM mapping) or ``"random"``.
        overwrite: replace an existing output folder (after the new one is complete).
        dry_run: check everything and compute the mapping without loading weights or writing.
        allow_pickle: allow loading a teacher whose weights are only pickled ``.bin`` files.
        seed: seed for random initialisation.

    Returns:
        A :class:`CompressResult` (its ``record()`` is what distilsd_compress.json holds).
    """
    if init not in INIT_MODES:
        raise InputError(f"unknown init '{init}'", hint=f"use one of: {', '.join(INIT_MODES)}")
    if not dry_run:
        if output_dir is None:
            raise InputError(
                "no output folder given", hint="pass -o/--output, or --dry-run to only print the mapping"
            )
        output_dir = Path(output_dir).expanduser()
        _check_output_dir(output_dir, overwrite)

    source = teacher if isinstance(teacher, TeacherSource) else resolve_teacher(teacher)
    layout = get_layout(arch, source.unet_config)
    if pipeline and source.kind not in ("pipeline", "hub"):
        raise InputError(
            f"--pipeline needs a whole teacher pipeline, but '{source.name}' is {'an architecture preset' if source.kind == 'preset' else 'a U-Net folder'}",
            hint="give the pipeline folder (with model_index.json) or hub id, or leave out --pipeline",
        )
    if init == "teacher" and not source.has_weights and not dry_run:
        raise InputError(
            f"'{source.name}' is an architecture preset without weights, so the student cannot be initialised from it",
            hint="use --init random, --dry-run or `distilsd arch`, or give a real teacher folder or hub id",
        )
    if not dry_run:
        _check_output_dir(output_dir, overwrite, source)

    config = student_config(source.unet_config, layout)
    if dry_run:
        mapping = tensor_mapping(source.unet_config, layout) if init == "teacher" else {}
        return CompressResult(
            teacher=source,
            layout=layout,
            init=init,
            mapping=mapping,
            student_config=config,
            teacher_params=sum(p.numel() for p in empty_unet(source.unet_config).parameters()),
            student_params=sum(p.numel() for p in empty_unet(config).parameters()),
            pipeline=pipeline,
            dry_run=True,
        )

    import torch
    from diffusers import UNet2DConditionModel

    if seed is not None:
        torch.manual_seed(seed)
    if init == "teacher":
        teacher_unet = load_teacher_unet(source, allow_pickle=allow_pickle)
        student, mapping = build_student(teacher_unet, layout, init="teacher")
        teacher_params = sum(p.numel() for p in teacher_unet.parameters())
        del teacher_unet
    else:
        # Random init needs only the teacher's config: no weights are read.
        student = UNet2DConditionModel.from_config(config)
        mapping = {}
        teacher_params = sum(p.numel() for p in empty_unet(source.unet_config).parameters())

    result = CompressResult(
        teacher=source,
        layout=layout,
        init=init,
        mapping=mapping,
        student_config=dict(student.config),
        teacher_params=teacher_params,
        student_params=sum(p.numel() for p in student.parameters()),
        output_dir=output_dir,
        unet_dir=output_dir / "unet" if pipeline else output_dir,
        pipeline=pipeline,
        extra={"seed": seed} if init == "random" else {},
    )

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = output_dir.with_name(f".{output_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if pipeline and source.kind == "pipeline":
            logger.debug("copying the teacher's pipeline components from %s", source.pipeline_dir)
            _copy_pipeline_components(source.pipeline_dir, tmp_dir)
            student.save_pretrained(tmp_dir / "unet", safe_serialization=True)
        elif pipeline:
            _save_hub_pipeline(source.name, student, tmp_dir, allow_pickle)
        else:
            student.save_pretrained(tmp_dir, safe_serialization=True)
        unet_tmp = tmp_dir / "unet" if pipeline else tmp_dir
        (unet_tmp / RECORD_FILENAME).write_text(
            json.dumps(result.record(), indent=2) + "\n", encoding="utf-8"
        )
        _move_into_place(tmp_dir, output_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return result
