"""Build BK-SDM-style student U-Nets from any SD 1.x/2.x teacher.

- :func:`get_layout`: a student layout (preset or custom spec), checked against a teacher config;
- :func:`build_student`: the student U-Net and its student -> teacher tensor mapping;
- :func:`compress`: teacher in, student U-Net or whole pipeline folder out;
- :func:`describe_architecture`: parameters, MACs, per-block breakdown, removed blocks and
  distillation pairs of a teacher and its students.

Importing this package is cheap: torch and diffusers are imported when a function needs them.
"""

from distilsd.compress.analysis import ArchitectureReport, ModelStats, describe_architecture, measure_macs
from distilsd.compress.build import build_student, student_config, teacher_tensor_name, tensor_mapping
from distilsd.compress.export import RECORD_FILENAME, CompressResult, compress
from distilsd.compress.layouts import (
    PRESET_ALIASES,
    PRESET_DESCRIPTIONS,
    StudentLayout,
    get_layout,
    layout_from_spec,
    preset_names,
)
from distilsd.compress.teacher import ARCHITECTURE_PRESETS, TeacherSource, load_teacher_unet, resolve_teacher

__all__ = [
    "ARCHITECTURE_PRESETS",
    "PRESET_ALIASES",
    "PRESET_DESCRIPTIONS",
    "RECORD_FILENAME",
    "ArchitectureReport",
    "CompressResult",
    "ModelStats",
    "StudentLayout",
    "TeacherSource",
    "build_student",
    "compress",
    "describe_architecture",
    "get_layout",
    "layout_from_spec",
    "load_teacher_unet",
    "measure_macs",
    "preset_names",
    "resolve_teacher",
    "student_config",
    "teacher_tensor_name",
    "tensor_mapping",
]
