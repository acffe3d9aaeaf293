"""Exports of the tiny pipeline, built once per session (exports are the slow part)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def openvino_export(tiny_pipeline_dir, tmp_path_factory):
    """The tiny pipeline exported to OpenVINO, fp32, static 64x64 px, batch 1, with the VAE encoder."""
    from distilsd.deploy import ExportSettings, export_model

    return export_model(
        str(tiny_pipeline_dir), tmp_path_factory.mktemp("ov") / "tiny-ov", ExportSettings(format="openvino")
    )


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory):
    """A private DISTILSD_CACHE for the session's on-the-fly exports."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTILSD_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def onnx_cached_export(tiny_pipeline_dir, export_cache):
    """The tiny pipeline exported to ONNX through the cache (as ``generate --backend onnx`` does)."""
    from distilsd.deploy import exported_pipeline_for

    return exported_pipeline_for(str(tiny_pipeline_dir), "onnx", progress=False)


def psnr(a, b) -> float:
    """PSNR in dB of two float images in [0, 1]."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
