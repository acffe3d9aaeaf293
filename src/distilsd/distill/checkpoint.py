"""Checkpoints: written atomically, the last K kept, everything needed to continue exactly.

``<run>/checkpoints/checkpoint-<step>/`` holds

- ``unet/`` (the trained weights) and ``unet_ema/`` (their moving average), each a diffusers
  U-Net folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) that
  ``UNet2DConditionModel.from_pretrained`` loads;
- ``optimizer.pt``, ``lr_scheduler.pt``, ``random_states_<rank>.pt``;
- ``trainer_state.json``: step, data position, EMA step, counters, and the config fields that
  decide the trajectory (a resume with different values is refused).

Each checkpoint is written into ``.checkpoint-<step>.tmp`` and renamed when complete, so a
crash or a full disk while saving leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from distilsd.errors import InputError, OutputError

logger = logging.getLogger(__name__)

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
STATE_FILE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def save_unet(
    model: torch.nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """Write a diffusers U-Net folder; ``state_dict`` replaces the model's own tensors (EMA)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    tensors = state_dict if state_dict is not None else model.state_dict()
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(tensors, str(folder / UNET_WEIGHTS), metadata={"format": "pt"})


def load_unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / UNET_WEIGHTS))


def ema_state_dict(model: torch.nn.Module, ema) -> dict[str, torch.Tensor]:
    """The model's state dict with each parameter replaced by its EMA shadow."""
    state = dict(model.state_dict())
    for (name, _), shadow in zip(model.named_parameters(), ema.shadow_params, strict=True):
        state[name] = shadow
    return state


def load_ema(model: torch.nn.Module, ema, folder: Path, optimization_step: int) -> None:
    weights = load_unet_weights(folder)
    for (name, _), shadow in zip(model.named_parameters(), ema.shadow_params, strict=True):
        shadow.data.copy_(weights[name].to(shadow.device, shadow.dtype))
    ema.optimization_step = optimization_step


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_checkpoint(resume: str, run_dir: Path) -> Path:
    """``latest`` -> the newest intact checkpoint of ``run_dir``; a path -> that checkpoint.

    ``latest`` (or a run folder) skips broken checkpoints, saying which file is broken; a
    checkpoint named by path must be intact. Temporary folders of a save that was killed are
    removed.
    """
    if resume == "latest":
        return _newest_intact(run_dir, "--resume latest")
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        problem = checkpoint_problem(path)
        if problem:
            raise InputError(
                f"--resume {resume}: the checkpoint is broken: {problem}",
                hint="resume from another checkpoint, or --resume latest for the newest intact one",
            )
        return path
    if list_checkpoints(path):
        return _newest_intact(path, f"--resume {resume}")
    raise InputError(
        f"--resume: {resume} is not a checkpoint (no {STATE_FILE}) nor a run folder with checkpoints"
    )


def _newest_intact(run_dir: Path, flag: str) -> Path:
    remove_stale_temporaries(run_dir)
    found = list_checkpoints(run_dir)
    if not found:
        folder = Path(run_dir)
        occupied = folder.is_dir() and any(folder.iterdir())
        raise InputError(
            f"{flag}: no checkpoint in {folder / 'checkpoints'}",
            hint="start over with --overwrite, or give a new -o folder"
            if occupied
            else "start without --resume",
        )
    broken = []
    for step, path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            if broken:
                logger.warning("resuming from checkpoint %d, the newest intact one", step)
            return path
        logger.warning("checkpoint %d is broken, skipped: %s", step, problem)
        broken.append(problem)
    raise InputError(
        f"{flag}: every checkpoint in {Path(run_dir) / 'checkpoints'} is broken (newest: {broken[0]})",
        hint="start over with --overwrite, or give a new -o folder",
    )


def remove_stale_temporaries(run_dir: Path) -> None:
    """Remove ``.checkpoint-N.tmp`` folders left by a save that was killed."""
    folder = Path(run_dir) / "checkpoints"
    if folder.is_dir():
        for tmp in folder.glob(".checkpoint-*.tmp"):
            logger.info("removing %s, left by an interrupted save", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """The first broken file of ``checkpoint`` and what is wrong with it; None when all read.

    Reads headers and checksums, not tensors: a truncated safetensors file fails its header's
    size check, a truncated torch file has no zip directory, a changed byte fails its CRC.
    """
    from safetensors import safe_open

    checkpoint = Path(checkpoint)
    for name in ("optimizer.pt", "lr_scheduler.pt", STATE_FILE):
        if not (checkpoint / name).is_file():
            return f"{checkpoint / name} is missing"
    for path in sorted(checkpoint.rglob("*.json")):
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            return f"{path} is not valid JSON ({exc})"
    state = read_state(checkpoint)
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return f"{checkpoint / STATE_FILE} has no global_step"
    for path in sorted(checkpoint.rglob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            return f"{path} is damaged ({exc})"
    for path in sorted(checkpoint.glob("*.pt")):
        try:
            with zipfile.ZipFile(path) as archive:
                bad_member = archive.testzip()
        except (zipfile.BadZipFile, OSError) as exc:
            return f"{path} is damaged ({exc})"
        if bad_member is not None:
            return f"{path} is damaged ({bad_member} fails its checksum)"
    return None


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def check_resume_config(checkpoint: Path, config, global_batch: int | None = None) -> None:
    """Refuse a checkpoint written on another training trajectory (config, or the global batch if given)."""
    from .config import config_differences

    state = read_state(checkpoint)
    diffs = config_differences(state.get("trajectory", {}), config)
    if global_batch is not None:
        saved = state.get("num_processes", 1) * state.get("train_batch_size", config.train_batch_size)
        if saved != global_batch:
            diffs.append(f"global batch: checkpoint has {saved}, now {global_batch}")
    if diffs:
        raise InputError(
            f"cannot resume from {checkpoint}: it was written with a different config ({'; '.join(diffs)})",
            hint="resume with the same settings, or start a new run in another folder",
        )


def temp_checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f".checkpoint-{step}.tmp"


def write_checkpoint_files(
    tmp: Path,
    model: torch.nn.Module,
    ema,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    state: dict[str, Any],
) -> None:
    """Everything but the per-process RNG files, into the temporary folder (main process)."""
    save_unet(model, tmp / "unet")
    if ema is not None:
        save_unet(model, tmp / "unet_ema", ema_state_dict(model, ema))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, default=str))


def commit_checkpoint(tmp: Path, keep: int) -> Path:
    """Rename the finished temporary folder into place and delete all but the newest ``keep``."""
    final = tmp.parent / tmp.name[1:].removesuffix(".tmp")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    run_dir = tmp.parent.parent
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def atomic_dir(parent: Path, name: str, write) -> None:
    """``write(tmp)`` fills ``parent/.name.tmp``, which then replaces ``parent/name``.

    A failed write removes the temporary folder (it may hold most of a model on a full disk).
    """
    final, tmp = Path(parent) / name, Path(parent) / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except WRITE_ERRORS as exc:
        error = as_os_error(exc, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise error from exc
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


# What a failed write raises: OSError from Python, RuntimeError from torch.save's zip writer,
# SafetensorError from safetensors' save_file.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
_OS_ERROR_RE = re.compile(r"os error (\d+)")
# Below this much free space a failed torch.save is taken for a full disk (its error has no errno).
_FULL_DISK_BYTES = 1 << 20


def free_bytes(folder: Path) -> int:
    """Free space on the file system that holds ``folder`` (or its nearest existing parent)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def as_os_error(exc: BaseException, folder: Path) -> OSError:
    """The OSError behind a failed write into ``folder``.

    safetensors says "... (os error 28)"; torch.save raises a RuntimeError without an errno,
    so a nearly full disk at that moment names the cause. Call before the partial files go.
    """
    if isinstance(exc, OSError):
        return exc
    text = str(exc)
    match = _OS_ERROR_RE.search(text)
    if match:
        code = int(match.group(1))
    elif free_bytes(folder) < _FULL_DISK_BYTES:
        code = errno.ENOSPC
    else:
        return OSError(errno.EIO, f"write failed ({text.strip()})")
    return OSError(code, os.strerror(code))


def describe_reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    return exc.strerror or str(exc)


def describe_intact(run_dir: Path) -> str:
    previous = list_checkpoints(run_dir)
    if not previous:
        return "no earlier checkpoint exists"
    step, path = previous[-1]
    return f"checkpoint {step} ({path}) is intact"


def describe_save_error(exc: BaseException, step: int, run_dir: Path) -> OutputError:
    """One line for a checkpoint that could not be written (its temporary folder already removed)."""
    reason = describe_reason(as_os_error(exc, run_dir))
    return OutputError(
        f"could not save checkpoint {step}: {reason}; {describe_intact(run_dir)}",
        hint="free space, then continue with --resume latest",
    )


def describe_pipeline_error(exc: BaseException, output_dir: Path) -> OutputError:
    """One line for a final pipeline that could not be written; its temporary files are removed."""
    reason = describe_reason(as_os_error(exc, output_dir))
    for tmp in Path(output_dir).glob(".*.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return OutputError(
        f"could not write the final pipeline into {output_dir}: {reason}; {describe_intact(output_dir)}",
        hint="free space, then continue with --resume latest",
    )


def load_checkpoint(
    checkpoint: Path, model: torch.nn.Module, ema, optimizer, lr_scheduler, process_index: int
) -> dict[str, Any]:
    """Restore weights, EMA, optimizer, LR schedule and this process's RNG; return the trainer state."""
    checkpoint = Path(checkpoint)
    state = read_state(checkpoint)
    missing, unexpected = model.load_state_dict(load_unet_weights(checkpoint / "unet"), strict=False)
    if missing or unexpected:
        raise InputError(
            f"checkpoint {checkpoint} does not fit this student ({len(missing)} missing, {len(unexpected)} unexpected tensors)",
            hint="resume with the same --arch / --student as the run that wrote it",
        )
    if ema is not None:
        if not (checkpoint / "unet_ema").is_dir():
            raise InputError(
                f"checkpoint {checkpoint} has no unet_ema/, but EMA is on", hint="resume with optim.ema=false"
            )
        load_ema(model, ema, checkpoint / "unet_ema", state.get("ema_optimization_step", 0))
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True))
    lr_scheduler.load_state_dict(
        torch.load(checkpoint / "lr_scheduler.pt", map_location="cpu", weights_only=False)
    )
    rng_file = checkpoint / f"random_states_{process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state
