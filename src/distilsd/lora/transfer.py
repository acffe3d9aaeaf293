"""Carry a teacher's LoRA over to its compressed student through the compression mapping.

``distilsd compress`` records, in the student's ``distilsd_compress.json``, which teacher
tensor each student tensor was copied from. A U-Net adapter on teacher module ``M`` goes to
every student module whose weight came from ``M.weight``; adapters of blocks the student
dropped are dropped (and counted). Text-encoder adapters carry over as they are: a student
shares its teacher's text encoder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from distilsd.errors import InputError, OutputError

from .names import LORA_WEIGHTS

COMPRESS_RECORD = "distilsd_compress.json"


@dataclass
class TransferReport:
    kept_modules: int
    dropped_modules: int
    kept_parameters: int
    dropped_parameters: int
    dropped: list[str]
    output: str

    @property
    def kept_share(self) -> float:
        total = self.kept_parameters + self.dropped_parameters
        return self.kept_parameters / total if total else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "kept_share": self.kept_share}


def compression_mapping(student: str | Path) -> dict[str, str]:
    """student module -> teacher module, from the record ``distilsd compress`` wrote."""
    from distilsd.models import BUILTIN_MODELS, builtin_folder

    folder = builtin_folder(str(student)) if str(student) in BUILTIN_MODELS else Path(student)
    for candidate in (folder / COMPRESS_RECORD, folder / "unet" / COMPRESS_RECORD):
        if candidate.is_file():
            tensors = json.loads(candidate.read_text())["mapping"]
            break
    else:
        raise InputError(
            f"student {student} has no compression mapping ({COMPRESS_RECORD})",
            hint="make the student with `distilsd compress --teacher TEACHER --arch bk-tiny -o STUDENT`, which writes it",
        )
    if not tensors:
        raise InputError(f"student {student} was built with random weights: no teacher module maps onto it")
    modules = {}
    for student_tensor, teacher_tensor in tensors.items():
        if student_tensor.endswith(".weight") and teacher_tensor.endswith(".weight"):
            modules[student_tensor.removesuffix(".weight")] = teacher_tensor.removesuffix(".weight")
    return modules


def transfer_lora(
    lora: str | Path, student: str | Path, output_dir: str | Path, overwrite: bool = False
) -> TransferReport:
    """Write the teacher LoRA ``lora`` mapped onto ``student`` into ``output_dir``."""
    from safetensors.torch import save_file

    from .files import _DIFFUSERS_SUFFIX, is_kohya, lora_file, read_lora

    output_dir = Path(output_dir)
    if (output_dir / LORA_WEIGHTS).exists() and not overwrite:
        raise OutputError(f"{output_dir / LORA_WEIGHTS} exists", hint="pass --overwrite to replace it")
    mapping = compression_mapping(student)
    by_teacher: dict[str, list[str]] = {}
    for student_module, teacher_module in mapping.items():
        by_teacher.setdefault(teacher_module, []).append(student_module)
    path = lora_file(lora)
    tensors, metadata = read_lora(path)
    if is_kohya(tensors):
        raise InputError(
            f"{path} is in the kohya layout",
            hint="transfer the diffusers file (pytorch_lora_weights.safetensors)",
        )
    out, dropped = {}, {}
    kept_modules: set[str] = set()
    kept_parameters = 0
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        match = _DIFFUSERS_SUFFIX.search(rest)
        if match is None:
            raise InputError(f"LoRA key {key} is not in diffusers' layout")
        if component != "unet":
            out[key] = tensor
            continue
        module = rest[: match.start()]
        targets = by_teacher.get(module)
        if not targets:
            dropped[module] = dropped.get(module, 0) + tensor.numel()
            continue
        for target in targets:
            out[f"unet.{target}{rest[match.start() :]}"] = tensor.clone()
            kept_modules.add(target)
        kept_parameters += tensor.numel()
    if not kept_modules:
        raise InputError(
            f"no adapter of {path} lands on a module the student kept",
            hint="is this the student of the LoRA's model?",
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / f".{LORA_WEIGHTS}.tmp"
    file_metadata = {"format": "pt"}
    if metadata:
        file_metadata["lora_adapter_metadata"] = json.dumps(metadata)
    save_file(out, str(tmp), metadata=file_metadata)
    tmp.replace(output_dir / LORA_WEIGHTS)
    report = TransferReport(
        kept_modules=len(kept_modules),
        dropped_modules=len(dropped),
        kept_parameters=kept_parameters,
        dropped_parameters=sum(dropped.values()),
        dropped=sorted(dropped),
        output=str(output_dir / LORA_WEIGHTS),
    )
    (output_dir / "lora_transfer.json").write_text(
        json.dumps({"lora": str(path), "student": str(student), **report.to_json()}, indent=1)
    )
    return report
