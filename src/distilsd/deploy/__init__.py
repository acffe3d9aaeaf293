"""Fast CPU runtimes: export SD pipelines to OpenVINO / ONNX and generate with them.

- :func:`export_model` / :func:`export_pipeline` write an exported folder (``distilsd export``);
- :func:`exported_pipeline` builds a stock diffusers pipeline on such a folder (same call
  signature as the PyTorch one); :func:`load_exported_pipeline` wraps it for ``generate``;
- :func:`exported_pipeline_for` exports on the fly into a cache (``generate --backend``).

OpenVINO, ONNX Runtime and NNCF are optional (``pip install 'distilsd[deploy]'``) and are
imported only when used.
"""

from distilsd.deploy.cache import export_cache_key, exported_pipeline_for
from distilsd.deploy.export import ExportSettings, export_model, export_pipeline
from distilsd.deploy.runtime import (
    FORMATS,
    MANIFEST_NAME,
    PRECISIONS,
    cpu_supports_bf16,
    exported_pipeline,
    is_exported_folder,
    load_exported_pipeline,
    read_manifest,
)

__all__ = [
    "FORMATS",
    "MANIFEST_NAME",
    "PRECISIONS",
    "ExportSettings",
    "cpu_supports_bf16",
    "export_cache_key",
    "export_model",
    "export_pipeline",
    "exported_pipeline",
    "exported_pipeline_for",
    "is_exported_folder",
    "load_exported_pipeline",
    "read_manifest",
]
