"""distilsd.convert: diffusers pipeline folder -> original (LDM) single-file checkpoint.

The reference reader is diffusers' own `from_single_file`: what it loads back must equal the
original models tensor for tensor and give the same image.
"""

from __future__ import annotations

import pytest
import torch

from distilsd.cli import main
from distilsd.errors import InputError

LDM_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")


def _load_keys_and_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module", params=["v1", "v2"])
def converted(request, tmp_path_factory):
    """(sd_version, pipeline folder, converted checkpoint) for the tiny v1 and v2 pipelines."""
    from distilsd.convert import convert_pipeline_to_single_file

    fixture = {"v1": "tiny_pipeline_dir", "v2": "tiny_v2_pipeline_dir"}[request.param]
    pipeline_dir = request.getfixturevalue(fixture)
    out = tmp_path_factory.mktemp(f"convert-{request.param}") / "model.safetensors"
    assert convert_pipeline_to_single_file(pipeline_dir, out) == out
    return int(request.param[1]), pipeline_dir, out


def test_ldm_key_names(converted):
    sd_version, pipeline_dir, out = converted
    checkpoint = _load_keys_and_tensors(out)
    assert all(key.startswith(LDM_PREFIXES) for key in checkpoint)
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # temp file renamed away
    probe = out.parent / "probe"
    probe.touch()
    assert out.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777  # not safetensors' own 0600
    probe.unlink()

    # SD v1 uses 1x1-conv transformer projections, SD v2 linear ones.
    proj_in = checkpoint["model.diffusion_model.input_blocks.1.1.proj_in.weight"]
    assert proj_in.ndim == (4 if sd_version == 1 else 2)
    assert checkpoint["model.diffusion_model.out.2.weight"].shape[0] == 4  # conv_out -> 4 latent channels
    assert "model.diffusion_model.middle_block.1.proj_out.weight" in checkpoint
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in checkpoint  # first downsampler
    # Upsamplers sit after the resnet in resnet-only stages, after the attention otherwise.
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in checkpoint
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in checkpoint
    # The VAE mid-block attention is stored as 1x1 convolutions in LDM.
    assert checkpoint["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert checkpoint["first_stage_model.encoder.mid.attn_1.proj_out.weight"].shape == (16, 16, 1, 1)
    # LDM counts decoder levels from full resolution (8 channels here) up; diffusers the other way.
    assert checkpoint["first_stage_model.decoder.up.0.block.1.conv1.weight"].shape[0] == 8
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in checkpoint
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in checkpoint

    if sd_version == 1:
        assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in checkpoint
        assert (
            "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in checkpoint
        )
        assert not any(key.startswith("cond_stage_model.model.") for key in checkpoint)
    else:
        width = 48
        assert checkpoint["cond_stage_model.model.token_embedding.weight"].shape == (49408, width)
        assert checkpoint["cond_stage_model.model.positional_embedding"].shape == (77, width)
        assert checkpoint["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"].shape == (
            3 * width,
            width,
        )
        assert checkpoint["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias"].shape == (
            3 * width,
        )
        assert "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight" in checkpoint
        assert not any(key.startswith("cond_stage_model.transformer.") for key in checkpoint)


def test_from_single_file_gives_back_the_same_pipeline(converted):
    from diffusers import StableDiffusionPipeline

    _, pipeline_dir, out = converted
    original = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    loaded = StableDiffusionPipeline.from_single_file(
        str(out), config=str(pipeline_dir), local_files_only=True
    )

    stored = 0
    for name in ("unet", "vae", "text_encoder"):
        expected = getattr(original, name).state_dict()
        actual = getattr(loaded, name).state_dict()
        assert set(actual) == set(expected), name
        for key, tensor in expected.items():
            assert torch.equal(actual[key], tensor), f"{name}.{key}"
        stored += sum(t.numel() for t in expected.values())
    # Nothing extra in the file either: it holds exactly the three models' numbers.
    assert sum(t.numel() for t in _load_keys_and_tensors(out).values()) == stored

    images = []
    for pipe in (original, loaded):
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        images.append(pipe("a red cube", num_inference_steps=2, generator=generator, output_type="np").images)
    assert images[0].shape == (1, 64, 64, 3)
    # Every tensor is equal (above); the images may differ by float noise only, since the
    # loaded copies can take other kernel paths (memory layout, thread count).
    assert abs(images[0] - images[1]).max() <= 1e-4


def test_unet_and_vae_mappings_invert_diffusers_reader_for_a_pruned_student():
    """BK-SDM-style U-Net (no mid block, one resnet per down stage): counts come from the config."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from distilsd.convert import unet_to_ldm, vae_to_ldm
    from distilsd.testing import tiny_unet, tiny_vae

    unet = tiny_unet(mid_block_type=None, layers_per_block=1)
    ldm = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    assert not any(".middle_block." in key for key in ldm)
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(unet.state_dict())
    assert all(torch.equal(back[k], v) for k, v in unet.state_dict().items())

    vae = tiny_vae()
    ldm = {"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert set(back) == set(vae.state_dict())
    assert all(torch.equal(back[k], v) for k, v in vae.state_dict().items())


def test_weights_without_an_ldm_place_are_refused():
    from distilsd.convert import unet_to_ldm
    from distilsd.testing import tiny_unet

    unet = tiny_unet()
    state_dict = dict(unet.state_dict())
    state_dict["adapter.lora_down.weight"] = torch.zeros(1)
    with pytest.raises(
        InputError, match="no place in the SD 1.x/2.x checkpoint layout: adapter.lora_down.weight"
    ):
        unet_to_ldm(state_dict, unet.config)
    with pytest.raises(InputError, match="per-stage layers_per_block"):
        unet_to_ldm(unet.state_dict(), {**unet.config, "layers_per_block": [2, 2, 2, 2]})


def test_cli_converts_and_casts(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "half.safetensors"
    main(["convert", str(tiny_pipeline_dir), "-o", str(out), "--dtype", "fp16"])
    assert f"wrote {out}" in capsys.readouterr().out
    tensors = _load_keys_and_tensors(out)
    assert {t.dtype for t in tensors.values()} == {torch.float16}


@pytest.mark.parametrize(
    "case, message",
    [
        ("not-a-pipeline", "is not a diffusers pipeline folder (no model_index.json)"),
        ("output-exists", "already exists"),
        ("wrong-suffix", "the output must be a .safetensors file, got model.ckpt"),
    ],
)
def test_cli_bad_input_is_one_line(case, message, tiny_pipeline_dir, tmp_path, capsys):
    pipeline_dir, out = tiny_pipeline_dir, tmp_path / "model.safetensors"
    if case == "not-a-pipeline":
        pipeline_dir = tmp_path / "empty"
        pipeline_dir.mkdir()
    elif case == "output-exists":
        out.write_bytes(b"keep me")
    else:
        out = tmp_path / "model.ckpt"

    with pytest.raises(SystemExit) as exc_info:
        main(["convert", str(pipeline_dir), "-o", str(out)])
    assert exc_info.value.code != 0
    stderr = capsys.readouterr().err
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert "Traceback" not in stderr
    if case == "output-exists":
        assert out.read_bytes() == b"keep me"
        assert "--overwrite" in stderr
    if case == "wrong-suffix":
        assert not out.exists()


def test_cli_refuses_a_pickle_only_folder_like_every_other_command(pickle_only_pipeline_dir, tmp_path, capsys):
    """convert loads through distilsd.models: the pickle refusal, not diffusers' missing-file error."""
    with pytest.raises(SystemExit) as exc_info:
        main(["convert", str(pickle_only_pipeline_dir), "-o", str(tmp_path / "model.safetensors")])
    assert exc_info.value.code != 0
    stderr = capsys.readouterr().err
    assert "has only pickled weights (.bin)" in stderr and "Traceback" not in stderr
    assert "ERROR" not in stderr  # diffusers' own log line came first before
    assert not (tmp_path / "model.safetensors").exists()
