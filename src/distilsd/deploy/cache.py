"""The export cache behind ``generate --backend``: export once per model, shape and precision.

An entry lives in ``$DISTILSD_CACHE/exports`` (default ``~/.cache/distilsd/exports``) under
``<model>-<format>-<precision>-<W>x<H>-b<batch>-<group>-<key>``. The key hashes the model's
identity (resolved path and the size and modification time of every file, or the hub id /
architecture name), the shapes, the precision, the format and the versions of distilsd,
torch, diffusers and the runtime. Changed weights give a new key; the entry they replace
(same model, format, precision and shape: same ``group``) is deleted once the new one is in
place, so stale exports do not pile up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from distilsd.deploy.export import ExportSettings, _versions, export_model
from distilsd.deploy.runtime import read_manifest
from distilsd.errors import DistilSDError
from distilsd.models import BUILTIN_MODELS, builtin_folder, cache_dir, is_architecture_name

logger = logging.getLogger(__name__)


def exports_dir() -> Path:
    return cache_dir("exports")


def _path_identity(path: Path) -> dict[str, Any]:
    """Resolved path plus (name, size, mtime) of every file: changes when any weight file does."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    listing = [
        [str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns]
        for p in files
    ]
    return {"path": str(path), "files": listing}


def model_identity(model: str, unet: str | None = None, vae: str | None = None) -> dict[str, Any]:
    """What identifies a model's weights, cheaply (no hashing of gigabytes)."""

    def one(source: str) -> dict[str, Any]:
        if is_architecture_name(source):
            return {"architecture": source}  # random weights from a fixed seed
        if source in BUILTIN_MODELS:
            return {"builtin": source, **_path_identity(builtin_folder(source))}
        path = Path(source).expanduser()
        if path.exists():
            return _path_identity(path)
        return {"hub": source}

    identity = {"model": one(model)}
    if unet is not None:
        identity["unet"] = one(unet)
    if vae is not None:
        # "tiny" is the model's own tiny_vae/ (inside the model's identity) or a random one.
        identity["vae"] = {"tiny": "model's own"} if vae == "tiny" else one(vae)
    return identity


def export_cache_key(
    model: str, settings: ExportSettings, unet: str | None = None, vae: str | None = None
) -> tuple[str, str]:
    """(group, key): group = model path + format + precision + shapes; key adds weights and versions."""
    identity = model_identity(model, unet, vae)
    shape = {
        "format": settings.format, "precision": settings.precision, "width": settings.width, "height": settings.height,
        "batch_size": settings.batch_size, "guidance": settings.guidance, "dynamic": settings.dynamic,
        "vae_encoder": settings.vae_encoder, "calibration_prompts": settings.calibration_prompts,
        "calibration_steps": settings.calibration_steps if settings.precision == "int8" else None,
    }  # fmt: skip
    where = {
        k: v.get("path", v.get("hub", v.get("architecture", v.get("builtin", v.get("tiny")))))
        for k, v in identity.items()
    }
    group = hashlib.sha256(json.dumps([where, shape], sort_keys=True).encode()).hexdigest()[:10]
    full = [identity, shape, _versions(settings.format, settings.precision)]
    key = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:16]
    return group, key


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[-40:] or "model"


def exported_pipeline_for(
    model: str,
    backend: str,
    width: int | None = None,
    height: int | None = None,
    batch_size: int = 1,
    precision: str = "fp32",
    *,
    unet: str | None = None,
    allow_pickle: bool = False,
    config: str | None = None,
    progress: bool = True,
    vae: str | None = None,
) -> Path:
    """The cached export of ``model`` for these shapes and precision, exporting it first if needed.

    ``width``/``height`` None mean the model's native size (resolved by the export); ``vae``
    exports a tiny VAE in place of the model's (``generate --vae``). Returns the export folder,
    ready for :func:`distilsd.deploy.load_exported_pipeline`.
    """
    settings = ExportSettings(
        format=backend, precision=precision, width=width, height=height, batch_size=batch_size
    )
    settings.validate()
    precision = settings.precision  # in today's spelling
    group, key = export_cache_key(model, settings, unet, vae)
    name = model + (f"+{unet}" if unet else "") + (f"+vae-{vae}" if vae else "")
    size = f"{width}x{height}" if width or height else "native"
    root = exports_dir()
    folder = root / f"{_slug(name)}-{backend}-{precision}-{size}-b{batch_size}-{group}-{key}"
    if folder.exists():
        try:
            read_manifest(folder)
            return folder
        except DistilSDError:
            shutil.rmtree(folder, ignore_errors=True)  # a damaged entry: export again
    if progress:
        what = f"{name} to {backend} ({precision}, {size}, batch {batch_size})"
        logger.info("exporting %s into the cache %s", what, folder)
    export_model(model, folder, settings, unet=unet, allow_pickle=allow_pickle, config=config, vae=vae)
    # Older exports of the same model, format, precision and shape are stale now.
    for old in root.glob(f"*-{group}-*"):
        if old != folder and old.is_dir() and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    return folder
