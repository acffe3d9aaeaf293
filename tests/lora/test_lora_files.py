"""LoRA files in generation: plain diffusers and `distilsd generate --lora` give the same image,
the kohya layout loads the same, fusing changes nothing, and bad files are refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distilsd.lora.files import parse_lora_spec, to_kohya

from .conftest import generate_image


def _generate(run_cli, tmp_path, model, name, *extra) -> np.ndarray:
    return generate_image(run_cli, tmp_path / name, model, "a red circle", *extra)


def _diffusers_image(model, lora_files, scales) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    names = []
    for i, path in enumerate(lora_files):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"a{i}")
        names.append(f"a{i}")
    if names:
        pipe.set_adapters(names, adapter_weights=scales)
    image = pipe(
        "a red circle", num_inference_steps=3, guidance_scale=5, generator=torch.Generator().manual_seed(5)
    ).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.mark.slow
def test_plain_diffusers_gives_the_image_of_generate_lora(
    tiny_pipeline_dir, unet_lora_run, run_cli, tmp_path
):
    lora = unet_lora_run / "pytorch_lora_weights.safetensors"
    kohya = unet_lora_run / "lora_kohya.safetensors"
    base = _generate(run_cli, tmp_path, tiny_pipeline_dir, "base")
    ours = _generate(run_cli, tmp_path, tiny_pipeline_dir, "lora", "--lora", f"{unet_lora_run}:0.7")
    assert np.abs(ours - base).max() > 8, "the LoRA must change the image for this test to mean anything"
    plain = _diffusers_image(tiny_pipeline_dir, [lora], [0.7])
    assert np.abs(ours - plain).max() <= 1
    # The kohya file written by distilsd, read by diffusers' own kohya converter: the same image.
    assert np.abs(_diffusers_image(tiny_pipeline_dir, [kohya], [0.7]) - plain).max() <= 1
    # ... and by distilsd.
    assert (
        np.abs(
            _generate(run_cli, tmp_path, tiny_pipeline_dir, "kohya", "--lora", f"{kohya}:0.7") - ours
        ).max()
        <= 1
    )
    fused = _generate(run_cli, tmp_path, tiny_pipeline_dir, "fused", "--lora", f"{lora}:0.7", "--fuse-lora")
    assert np.abs(fused - ours).max() <= 1
    # Two LoRAs mix: the same file at 0.3 and 0.4 is the file at 0.7.
    mixed = _generate(
        run_cli, tmp_path, tiny_pipeline_dir, "mixed", "--lora", f"{lora}:0.3", "--lora", f"{kohya}:0.4"
    )
    assert np.abs(mixed - ours).max() <= 1


def test_plain_diffusers_applies_every_adapted_module(tiny_pipeline_dir, tmp_path):
    """A LoRA on attention, convolutions and feed-forwards, read by diffusers' own loader (and its
    kohya converter): every adapted module changes, and both layouts change it alike."""
    from diffusers import StableDiffusionPipeline

    from distilsd.lora.files import write_kohya
    from distilsd.testing import save_random_lora

    lora = save_random_lora(
        tiny_pipeline_dir,
        tmp_path / "mixed.safetensors",
        targets=("to_q", "to_out.0", "proj_in", "conv1", "ff.net.2"),
    )
    kohya = write_kohya(lora, tmp_path / "mixed_kohya.safetensors")

    def fused_unet(path):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
        if path is not None:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name)
            pipe.fuse_lora()
            pipe.unload_lora_weights()  # the fused weights under their own names
        return pipe.unet.state_dict()

    base, tuned, via_kohya = fused_unet(None), fused_unet(lora), fused_unet(kohya)
    changed = {key.rsplit(".", 2)[-2] for key in base if not torch.equal(base[key], tuned[key])}
    assert changed == {"to_q", "0", "proj_in", "conv1", "2"}, (
        changed
    )  # to_out.0 and ff.net.2 end in their index
    for key in base:
        assert torch.allclose(tuned[key], via_kohya[key], atol=1e-5), key

    # Files of earlier distilsd versions mixed diffusers' attention keys (lora.down) with peft's
    # (lora_A) elsewhere; distilsd still loads every module of them.
    from safetensors.torch import load_file, save_file

    from distilsd.lora.files import apply_loras, parse_lora_spec

    renamed = {".lora_A.weight": ".lora.down.weight", ".lora_B.weight": ".lora.up.weight"}
    mixed = {}
    for key, tensor in load_file(lora).items():
        if ".to_q." in key or ".to_out.0." in key:
            for new, old in renamed.items():
                key = key.replace(new, old)
        mixed[key] = tensor
    save_file(mixed, tmp_path / "old.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    apply_loras(pipe, [parse_lora_spec(str(tmp_path / "old.safetensors"))], fuse=True)
    for key, tensor in pipe.unet.state_dict().items():
        assert torch.allclose(tensor, tuned[key], atol=1e-5), key


def test_kohya_keys_and_alpha():
    tensors = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.down.weight": torch.zeros(
            4, 16
        ),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.up.weight": torch.zeros(
            16, 4
        ),
        "text_encoder.encoder.layers.1.self_attn.q_proj.lora_linear_layer.down.weight": torch.zeros(4, 32),
    }
    kohya = to_kohya(tensors, {"unet.lora_alpha": 2, "text_encoder.lora_alpha": 4})
    assert set(kohya) == {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha",
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight",
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj.alpha",
    }
    assert float(kohya["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha"]) == 2
    assert float(kohya["lora_te_text_model_encoder_layers_1_self_attn_q_proj.alpha"]) == 4


def test_lora_spec_parsing(tmp_path):
    assert parse_lora_spec("a/b.safetensors:0.5").scale == 0.5
    assert parse_lora_spec("a/b.safetensors").scale == 1.0
    assert str(parse_lora_spec("C:weird").path) == "C:weird"


@pytest.mark.slow
def test_bad_lora_files_are_refused_in_one_line(
    tiny_pipeline_dir, tiny_v2_pipeline_dir, unet_lora_run, tmp_path, expect_cli_error, run_cli
):
    args = [
        "generate",
        "a red circle",
        "--model",
        str(tiny_v2_pipeline_dir),
        "-o",
        str(tmp_path / "x"),
        "--steps",
        "1",
        "-q",
    ]
    # Made for the v1 tiny model (cross-attention 32), applied to the v2 one (48): the first module named.
    expect_cli_error([*args, "--lora", str(unet_lora_run)], "does not fit this model", "module", "features")
    v1 = [
        "generate",
        "a red circle",
        "--model",
        str(tiny_pipeline_dir),
        "-o",
        str(tmp_path / "y"),
        "--steps",
        "1",
        "-q",
    ]
    # A kohya file with keys this model does not have: refused and counted, or loaded in part on request.
    kohya = load_file(str(unet_lora_run / "lora_kohya.safetensors"))
    extra = {
        f"lora_unet_mid_block_attentions_7_proj_{i}.lora_down.weight": torch.zeros(4, 32) for i in range(3)
    }
    save_file({**kohya, **extra}, str(tmp_path / "odd.safetensors"))
    expect_cli_error(
        [*v1, "--lora", str(tmp_path / "odd.safetensors")],
        "3 modules this model does not have",
        "--lora-skip-unknown",
    )
    code, _, err = run_cli([*v1, "--lora", str(tmp_path / "odd.safetensors"), "--lora-skip-unknown"])
    assert code == 0, err
    # Pickles only with --allow-pickle.
    torch.save(load_file(str(unet_lora_run / "pytorch_lora_weights.safetensors")), tmp_path / "old.pt")
    expect_cli_error([*v1, "--lora", str(tmp_path / "old.pt")], "pickled LoRA", "--allow-pickle")
    expect_cli_error([*v1, "--lora", str(tmp_path / "missing.safetensors")], "does not exist")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_skip_unknown_keeps_the_lora_alpha_of_the_files_metadata(tiny_pipeline_dir, tmp_path, run_cli):
    """A diffusers-layout file with alpha 3 x rank, loaded in part: still scaled by alpha / rank, not 1."""
    import json

    from safetensors import safe_open

    from distilsd.testing import save_random_lora

    lora = save_random_lora(tiny_pipeline_dir, tmp_path / "plain.safetensors", seed=1)
    with safe_open(str(lora), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    config["unet.lora_alpha"] = 3 * config["unet.r"]
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config)}
    tensors = load_file(str(lora))
    save_file(tensors, str(tmp_path / "alpha3.safetensors"), metadata=metadata)
    tensors["unet.no_such_block.to_q.lora.down.weight"] = torch.zeros(4, 8)  # a module the model lacks
    tensors["unet.no_such_block.to_q.lora.up.weight"] = torch.zeros(8, 4)
    save_file(tensors, str(tmp_path / "alpha3_extra.safetensors"), metadata=metadata)
    scale1 = _generate(run_cli, tmp_path, tiny_pipeline_dir, "s1", "--lora", str(lora))
    scale3 = _generate(
        run_cli, tmp_path, tiny_pipeline_dir, "s3", "--lora", str(tmp_path / "alpha3.safetensors")
    )
    partial = _generate(run_cli, tmp_path, tiny_pipeline_dir, "p3", "--lora", str(tmp_path / "alpha3_extra.safetensors"),
                        "--lora-skip-unknown")  # fmt: skip
    assert np.abs(scale3 - scale1).max() > 8, "alpha 3 x rank must change the image"
    assert np.abs(partial - scale3).max() <= 1


@pytest.mark.slow
def test_export_fuses_the_lora_and_the_runtime_draws_the_lora_image(
    tiny_pipeline_dir, unet_lora_run, run_cli, tmp_path
):
    pytest.importorskip("onnxruntime")
    export = tmp_path / "onnx"
    code, _, err = run_cli(
        ["export", "-m", str(tiny_pipeline_dir), "--format", "onnx", "--lora", f"{unet_lora_run}:0.7", "-o", str(export)]
    )  # fmt: skip
    assert code == 0, err
    manifest = (export / "distilsd-export.json").read_text()
    assert "+lora:run:0.7" in manifest
    torch_image = _generate(run_cli, tmp_path, tiny_pipeline_dir, "torch", "--lora", f"{unet_lora_run}:0.7")
    base = _generate(run_cli, tmp_path, tiny_pipeline_dir, "base")
    exported = _generate(run_cli, tmp_path, export, "onnx")
    # The exported model draws the LoRA's image (fp32 ONNX Runtime: a few levels of rounding), not the base one.
    assert np.abs(exported - torch_image).mean() < 1.0
    assert np.abs(exported - torch_image).mean() < np.abs(base - torch_image).mean() / 4
