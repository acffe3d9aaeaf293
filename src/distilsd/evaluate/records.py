"""Results records: what a run did, on what, with which versions, next to its outputs.

Every ``distilsd eval`` and ``distilsd bench`` run writes one JSON file so that a number
quoted in the docs can name the run (command, settings, versions, hardware) it came from.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from distilsd import __version__
from distilsd.errors import OutputError

# Packages whose version can change a number in a record.
RECORDED_PACKAGES = (
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "accelerate",
    "numpy",
    "scipy",
    "pillow",
    "pytorch-fid",
    "torch-fidelity",
    "open_clip_torch",
)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"distilsd": __version__, "python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_info() -> dict[str, Any]:
    """CPU model and cores, RAM, GPU (if any) and the torch thread count."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        info["ram_gib"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
        }
    else:
        info["gpu"] = None
    return info


def git_commit() -> str | None:
    """The commit of the distilsd checkout this runs from (with '+dirty' if it has changes), if any."""
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def make_record(kind: str, settings: dict[str, Any], results: Any) -> dict[str, Any]:
    """A results record: the command line, settings, versions, hardware and numbers."""
    return {
        "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["distilsd", *sys.argv[1:]])
        if Path(sys.argv[0]).name in ("distilsd", "__main__.py")
        else None,
        "settings": settings,
        "results": results,
        "versions": package_versions(),
        "hardware": hardware_info(),
        "git_commit": git_commit(),
    }


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as JSON atomically (a temp file renamed into place)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write the results record {path}: {exc.strerror or exc}") from None
    return path
