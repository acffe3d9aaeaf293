"""Exports of guidance-embedded U-Nets (LCM students): the guidance scale is an input, not a CFG batch."""

from __future__ import annotations

import json
import shutil

import pytest
import torch


@pytest.fixture(scope="module")
def lcm_like_pipeline_dir(tiny_pipeline_dir, tmp_path_factory):
    """The tiny pipeline with a U-Net that embeds the guidance scale (time_cond_proj_dim) and an LCMScheduler.

    The embedding's projection gets random (non-zero) weights so that the guidance scale changes
    the output, as in a trained LCM student.
    """
    from diffusers import LCMScheduler, UNet2DConditionModel

    folder = tmp_path_factory.mktemp("lcm-like") / "pipeline"
    shutil.copytree(tiny_pipeline_dir, folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    student = UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": 32})
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("time_embedding.cond_proj") for name in missing)
    with torch.no_grad():
        torch.manual_seed(0)
        student.time_embedding.cond_proj.weight.normal_(0, 0.5)
    student.save_pretrained(folder / "unet")
    LCMScheduler.from_pretrained(folder / "scheduler").save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.slow  # two ONNX exports of the tiny pipeline
def test_an_lcm_unet_exports_with_its_guidance_embedding(lcm_like_pipeline_dir, tmp_path):
    from distilsd.deploy import ExportSettings, export_model, load_exported_pipeline
    from distilsd.generate import load_pipeline

    folder = export_model(str(lcm_like_pipeline_dir), tmp_path / "onnx", ExportSettings(format="onnx"))
    manifest = json.loads((folder / "distilsd-export.json").read_text())
    assert manifest["shapes"]["guidance_embedded"] is True
    assert manifest["shapes"]["unet_batch"] == 1 and manifest["shapes"]["guidance_batch"] is False
    assert manifest["components"]["unet"]["inputs"][-1] == "timestep_cond"

    exported = load_exported_pipeline(folder).pipeline
    reference = load_pipeline(str(lcm_like_pipeline_dir), device="cpu").pipeline
    assert type(exported.scheduler).__name__ == "LCMScheduler"

    def image(pipe, guidance):
        return pipe("a red circle", num_inference_steps=2, guidance_scale=guidance, output_type="np",
                    generator=torch.Generator().manual_seed(1)).images[0]  # fmt: skip

    for guidance in (2.0, 8.0):
        assert abs(image(exported, guidance) - image(reference, guidance)).max() < 2e-3
    # The embedding is really an input: another guidance scale gives another image.
    assert abs(image(exported, 2.0) - image(exported, 8.0)).max() > 1e-3

    dynamic = export_model(str(lcm_like_pipeline_dir), tmp_path / "dyn", ExportSettings(format="onnx", dynamic=True))
    pipe = load_exported_pipeline(dynamic).pipeline
    assert abs(image(pipe, 8.0) - image(reference, 8.0)).max() < 2e-3
