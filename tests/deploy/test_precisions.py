"""bf16 and int8 exports run; int8 (NNCF) stays close to the PyTorch image on the tiny pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import psnr


def _image(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(seed), output_type="np"
    ).images


@pytest.fixture(scope="module")
def torch_image(tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    return _image(
        StableDiffusionPipeline.from_pretrained(
            tiny_pipeline_dir, safety_checker=None, requires_safety_checker=False
        )
    )


@pytest.mark.slow
def test_bf16_export_runs(tiny_pipeline_dir, tmp_path, torch_image, capsys):
    from distilsd.deploy import ExportSettings, cpu_supports_bf16, export_model, exported_pipeline

    folder = export_model(
        str(tiny_pipeline_dir),
        tmp_path / "bf16",
        ExportSettings(format="openvino", precision="bf16", vae_encoder=False),
    )
    pipe = exported_pipeline(folder)
    if cpu_supports_bf16():
        assert pipe.inference_precision == "bf16"
        assert psnr(_image(pipe), torch_image) >= 25.0
    else:  # falls back to fp32, and says so
        assert pipe.inference_precision == "fp32"
        assert "no bf16 support" in capsys.readouterr().err
        assert psnr(_image(pipe), torch_image) >= 35.0


@pytest.mark.slow
def test_int8_export_runs_close_to_pytorch(tiny_pipeline_dir, tmp_path, torch_image):
    from distilsd.deploy import ExportSettings, export_model, exported_pipeline

    settings = ExportSettings(
        format="openvino", precision="int8", vae_encoder=False, calibration_prompts=["a red circle", "a blue square"],
        calibration_steps=2, quick_calibration=True,
    )  # fmt: skip
    folder = export_model(str(tiny_pipeline_dir), tmp_path / "int8", settings)
    manifest = json.loads((folder / "distilsd-export.json").read_text())
    assert manifest["precision"] == "int8"
    assert manifest["calibration"]["unet_samples"] >= 2 * 2  # prompts x steps (PNDM adds a warm-up call)
    # The U-Net really holds int8 (fake-quantize) ops now.
    assert (
        "FakeQuantize" in (folder / "unet" / "openvino_model.xml").read_text()
        or "u8" in (folder / "unet" / "openvino_model.xml").read_text()
    )
    assert psnr(_image(exported_pipeline(folder)), torch_image) >= 20.0


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_precision_follows_the_cpu(monkeypatch, has_bf16):
    """`--precision auto`: bf16 for OpenVINO where the CPU runs it natively, else fp32; ONNX always fp32."""
    from distilsd.deploy import ExportSettings, runtime

    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: has_bf16)
    assert runtime.auto_precision("openvino") == ("bf16" if has_bf16 else "fp32")
    assert runtime.auto_precision("onnx") == "fp32"
    settings = ExportSettings(format="openvino", precision="auto")
    settings.validate()
    assert settings.precision == ("bf16" if has_bf16 else "fp32")  # resolved before anything is written


def test_export_cli_auto_precision_writes_the_resolved_one(tiny_pipeline_dir, tmp_path, run_cli, monkeypatch):
    from distilsd.deploy import runtime

    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)
    out = tmp_path / "auto"
    code, _, err = run_cli(["export", "-m", str(tiny_pipeline_dir), "--precision", "auto", "-o", str(out),
                            "--no-vae-encoder"])  # fmt: skip
    assert code == 0, err
    assert json.loads((out / "distilsd-export.json").read_text())["precision"] == "fp32"
    assert "(fp32, 64x64" in err
