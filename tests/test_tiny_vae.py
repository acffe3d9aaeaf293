"""Tiny VAEs: trained against a pipeline's VAE, swapped in by ``generate --vae``, refused when they do not fit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from distilsd.tiny_vae import INFO_FILE, tiny_vae_config


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    from distilsd.shapes.data import make_data

    return make_data(tmp_path_factory.mktemp("shapes") / "data", count=8, progress=False)


@pytest.fixture(scope="module")
def tiny_vae_run(tmp_path_factory, tiny_pipeline_dir, shapes_data):
    """The shapes-tiny-vae recipe, shrunk: 3 steps against the tiny pipeline's VAE."""
    from distilsd.cli import main

    out = tmp_path_factory.mktemp("tiny-vae") / "run"
    args = ["train", "-c", "shapes-tiny-vae", "--no-progress", f"model={tiny_pipeline_dir}",
            f"data.source={shapes_data}", f"output_dir={out}", "train_batch_size=2", "max_steps=3",
            "checkpoint_every=0", "log_every=1", "vae.tiny_channels=8"]  # fmt: skip
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code == 0
    return out


def test_the_config_follows_the_vae_levels_and_taesd_blocks():
    vae = {"block_out_channels": [32, 64, 64], "latent_channels": 4}
    config = tiny_vae_config(vae, channels=16)
    assert config["num_encoder_blocks"] == [1, 3, 3] and config["num_decoder_blocks"] == [3, 3, 1]
    assert config["decoder_block_out_channels"] == [16, 16, 16] and config["scaling_factor"] == 1.0
    assert tiny_vae_config({**vae, "block_out_channels": [1, 2, 3, 4]})["num_encoder_blocks"] == [1, 3, 3, 3]
    from distilsd.errors import InputError

    with pytest.raises(InputError, match="one count per VAE level"):
        tiny_vae_config(vae, blocks=[1, 2])


@pytest.mark.slow  # the shared fixture trains a tiny VAE for 3 steps (about a minute here)
def test_training_writes_an_autoencoder_tiny_folder_that_learns(tiny_vae_run, tiny_pipeline_dir):
    from diffusers import AutoencoderKL, AutoencoderTiny

    tiny = AutoencoderTiny.from_pretrained(tiny_vae_run)  # the run folder itself
    vae = AutoencoderKL.from_pretrained(tiny_pipeline_dir, subfolder="vae")
    info = json.loads((tiny_vae_run / INFO_FILE).read_text())
    assert info["trained"] == "tiny-vae" and info["steps"] == 3
    assert info["teacher_vae"]["scaling_factor"] == pytest.approx(vae.config.scaling_factor)
    assert tiny.config.latent_channels == vae.config.latent_channels and tiny.config.scaling_factor == 1.0
    rows = (tiny_vae_run / "logs" / "train.csv").read_text().splitlines()
    assert rows[0].split(",")[2:5] == ["loss", "decoder_l1", "encoder_mse"] and len(rows) == 4
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():  # same spatial scaling as the VAE: 64 px <-> its latent size
        latents = tiny.encode(pixels).latents
        assert latents.shape == vae.encode(pixels).latent_dist.mean.shape
        assert tiny.decode(latents).sample.shape == pixels.shape


@pytest.mark.slow  # the shared fixture trains a tiny VAE for 3 steps (about a minute here)
def test_generate_swaps_the_tiny_vae_in(tiny_vae_run, tiny_pipeline_dir, tmp_path, run_cli):
    from distilsd.generate import load_pipeline

    loaded = load_pipeline(str(tiny_pipeline_dir), vae=str(tiny_vae_run), device="cpu")
    assert type(loaded.pipeline.vae).__name__ == "AutoencoderTiny" and "+vae:" in loaded.name
    code, out, err = run_cli(["generate", "a red circle", "-m", str(tiny_pipeline_dir), "--vae", str(tiny_vae_run),
                              "--steps", "2", "-o", str(tmp_path / "out"), "-q", "--device", "cpu"])  # fmt: skip
    assert code == 0, err
    assert out.strip().endswith(".png")
    # A pipeline folder's own tiny_vae/ is what `--vae tiny` takes.
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    shutil.copytree(tiny_vae_run, model / "tiny_vae", ignore=shutil.ignore_patterns("checkpoints", "logs"))
    assert (
        type(load_pipeline(str(model), vae="tiny", device="cpu").pipeline.vae).__name__ == "AutoencoderTiny"
    )


@pytest.mark.slow  # the shared fixture trains a tiny VAE for 3 steps (about a minute here)
def test_a_tiny_vae_that_does_not_fit_is_refused(tiny_vae_run, tiny_pipeline_dir, tmp_path, expect_cli_error):
    from diffusers import AutoencoderTiny

    base = [
        "generate",
        "a red circle",
        "-m",
        str(tiny_pipeline_dir),
        "-o",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    other_scale = tmp_path / "other-scale"
    shutil.copytree(tiny_vae_run, other_scale, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    info = json.loads((other_scale / INFO_FILE).read_text())
    info["teacher_vae"]["scaling_factor"] = 0.13025  # trained for another VAE's latents (SDXL's)
    (other_scale / INFO_FILE).write_text(json.dumps(info))
    expect_cli_error([*base, "--vae", str(other_scale)], "trained for latents with scaling_factor 0.13025")
    channels = tmp_path / "channels"
    AutoencoderTiny(
        **{**tiny_vae_config({"block_out_channels": [1, 2], "latent_channels": 8}, 8)}
    ).save_pretrained(channels)
    expect_cli_error([*base, "--vae", str(channels)], "8 latent channels")
    expect_cli_error([*base, "--vae", "tiny"], "this model ships no tiny VAE")
    expect_cli_error([*base, "--vae", str(tmp_path)], "not a tiny VAE folder")
    expect_cli_error(
        [*base, "--deepcache", "2", "--backend", "onnx"], "--deepcache works with the PyTorch backend only"
    )


def test_the_tiny_vae_config_is_checked(tmp_path, expect_cli_error):
    expect_cli_error(["train", "-c", "shapes-tiny-vae", "vae.train_decoder_only=true", "-o", str(tmp_path)],
                     "tiny-vae takes neither")  # fmt: skip


@pytest.mark.slow  # the shared fixture trains a tiny VAE for 3 steps (about a minute here)
def test_check_vae_decodes_with_the_tiny_vae(tiny_vae_run, tiny_pipeline_dir, run_cli):
    code, out, err = run_cli(["shapes", "check-vae", "-m", str(tiny_pipeline_dir), "--tiny-vae", str(tiny_vae_run),
                              "--prompts-per-group", "2"])  # fmt: skip
    assert code == 0, err
    scores = json.loads(out)
    assert "tiny VAE" in scores["model"] and scores["render_alignment_single"] == 1.0
    assert scores["reconstruction_l1"] > 0
    # The full VAE on the same latents, and the paired difference the gate reads.
    assert 0 <= scores["vae_alignment_single"] <= 1 and set(scores["tiny_minus_vae"]) == {"single", "two"}
    single = scores["tiny_minus_vae"]["single"]
    assert single["low"] <= single["value"] <= single["high"]
    assert single["value"] == scores["reconstruction_alignment_single"] - scores["vae_alignment_single"]
    classic = scores["classic"]  # the same pairing, read by the classical reader
    assert (
        classic["tiny_minus_vae"]["two"]["value"]
        == classic["reconstruction_alignment_two"] - classic["vae_alignment_two"]
    )


@pytest.mark.slow  # trains a tiny VAE for 3 steps and exports the tiny pipeline twice
def test_export_puts_the_tiny_vae_in_place_of_the_vae(tiny_vae_run, tiny_pipeline_dir, tmp_path, monkeypatch,
                                                      run_cli, expect_cli_error):  # fmt: skip
    """`export --vae` exports the tiny decoder and encoder; the exported pipeline decodes like PyTorch's."""
    import numpy as np
    from PIL import Image

    from distilsd.deploy import ExportSettings, export_model, load_exported_pipeline
    from distilsd.generate import load_pipeline

    folder = export_model(str(tiny_pipeline_dir), tmp_path / "ov", ExportSettings(format="onnx"),
                          vae=str(tiny_vae_run))  # fmt: skip
    manifest = json.loads((folder / "distilsd-export.json").read_text())
    assert manifest["source"]["vae"] == str(tiny_vae_run) and "+vae:" in manifest["source"]["name"]
    assert json.loads((folder / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderTiny"

    exported = load_exported_pipeline(folder).pipeline
    torch_pipe = load_pipeline(str(tiny_pipeline_dir), vae=str(tiny_vae_run), device="cpu").pipeline
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    decoded = exported.vae.decode(latents, return_dict=False)[0]
    expected = torch_pipe.vae.decode(latents, return_dict=False)[0]
    assert decoded.shape == expected.shape and torch.allclose(decoded, expected, atol=1e-4)
    # Image-to-image reads the tiny encoder's latents (AutoencoderTiny's `.latents`, not a distribution).
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    encoded = load_exported_pipeline(folder, task="image2image").pipeline.vae.encode(image).latents
    assert torch.allclose(encoded, torch_pipe.vae.encode(image).latents, atol=1e-4)

    # generate: through the export cache with --backend, refused on an exported folder.
    monkeypatch.setenv("DISTILSD_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli(["generate", "a red circle", "-m", str(tiny_pipeline_dir), "--backend", "onnx",
                              "--vae", str(tiny_vae_run), "--steps", "2", "-o", str(tmp_path / "out"), "-q"])  # fmt: skip
    assert code == 0, err
    assert Image.open(out.strip().splitlines()[-1]).size == (64, 64)
    cached = [p for p in (tmp_path / "cache" / "exports").iterdir() if not p.name.startswith(".")]
    assert len(cached) == 1 and "vae" in cached[0].name
    assert np.asarray(Image.open(out.strip().splitlines()[-1])).std() > 0
    expect_cli_error(["generate", "a red circle", "-m", str(folder), "--vae", str(tiny_vae_run),
                      "-o", str(tmp_path / "out2")], "cannot change an exported model's decoder")  # fmt: skip


def test_the_shapes_models_ship_their_tiny_decoder(tmp_path, run_cli):
    """`--vae tiny` on the built-ins takes the shipped one (20,000 steps in two stages against the shapes VAE)."""
    from distilsd.generate import load_pipeline
    from distilsd.models import builtin_folder

    for name in ("shapes", "shapes-tiny", "shapes-tiny-lcm"):
        assert (builtin_folder(name) / "tiny_vae" / INFO_FILE).is_file(), name
    loaded = load_pipeline("shapes-tiny", vae="tiny", device="cpu")
    assert type(loaded.pipeline.vae).__name__ == "AutoencoderTiny"
    assert loaded.pipeline.vae.dtype == torch.float32  # stored in fp16, run in the pipeline's dtype
    code, out, err = run_cli(["generate", "a red star on the left", "-m", "shapes-tiny", "--vae", "tiny",
                              "--steps", "4", "-o", str(tmp_path), "-q", "--device", "cpu"])  # fmt: skip
    assert code == 0, err
    assert out.strip().endswith(".png")


def test_the_edge_loss_charges_edges_only():
    from distilsd.distill.vae import edge_l1

    sharp = torch.zeros(1, 3, 16, 16)
    sharp[..., 7:9] = 1.0  # a two-pixel bar: a thin part, like a star's point
    blurred = torch.nn.functional.avg_pool2d(sharp, (1, 5), stride=1, padding=(0, 2), count_include_pad=False)
    assert edge_l1(sharp, sharp) == 0
    assert edge_l1(sharp + 0.3, sharp) == pytest.approx(0.0, abs=1e-7)  # a flat colour shift has no edges
    assert edge_l1(blurred, sharp) > 0.05
    # A blurred edge costs more in differences than in pixels: what L1 / MSE alone let a decoder off with.
    assert edge_l1(blurred, sharp) > (blurred - sharp).abs().mean()


@pytest.mark.slow  # trains a tiny VAE for one step
def test_a_tiny_vae_fine_tunes_from_another_with_the_edge_loss(
    tiny_vae_run, tiny_pipeline_dir, shapes_data, tmp_path
):
    """`--student TINY_VAE` continues a trained tiny VAE (the shipped decoder's second stage)."""
    from diffusers import AutoencoderTiny

    from distilsd.cli import main

    out = tmp_path / "ft"
    args = ["train", "-c", "shapes-tiny-vae", "--no-progress", f"model={tiny_pipeline_dir}",
            f"data.source={shapes_data}", f"output_dir={out}", "train_batch_size=2", "max_steps=1",
            "checkpoint_every=0", "log_every=1", f"student={tiny_vae_run}", "vae.edge_weight=1.0", "vae.mse_weight=0",
            "optim.learning_rate=1e-12", "optim.lr_warmup_steps=0"]  # fmt: skip
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code == 0
    before = AutoencoderTiny.from_pretrained(tiny_vae_run).state_dict()
    after = AutoencoderTiny.from_pretrained(out).state_dict()
    assert all(torch.allclose(before[name], after[name], atol=1e-6) for name in before)  # started from it
    row = (out / "logs" / "train.csv").read_text().splitlines()[1].split(",")
    loss, decoder_l1, encoder_mse = (float(value) for value in row[2:5])
    assert loss > decoder_l1 + encoder_mse + 1e-4  # the edge term on top (no MSE here)


def test_the_ship_script_names_every_stage_of_a_fine_tuned_decoder(tmp_path, monkeypatch):
    """provenance.json's commands come from the runs' config.yaml: a fine-tune names its first stage too."""
    import sys
    from pathlib import Path

    from distilsd.distill import load_config
    from distilsd.distill.config import TrainConfig, save_config

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "scripts"))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("ship_shapes_tiny_vae", None)
    from ship_shapes_tiny_vae import training_commands

    def fake_run(name, steps, **overrides):  # what `distilsd train -c shapes-tiny-vae ...` leaves
        base = TrainConfig()
        base.loss.l_out = base.loss.l_feat = 0.0
        values = {"output_dir": f"runs/{name}", "max_steps": steps, "checkpoint_every": 100, **overrides}
        Path("runs", name).mkdir(parents=True)
        save_config(load_config("shapes-tiny-vae", values, base=base), Path("runs", name, "config.yaml"))
        Path("runs", name, "distill_info.json").write_text(
            json.dumps({"trained": "tiny-vae", "steps": steps})
        )
        return Path("runs", name)

    first = fake_run("first", 12000)
    second = fake_run(
        "second", 5000, **{"student": str(first), "optim.learning_rate": 3e-4, "vae.edge_weight": 1.0}
    )
    assert training_commands(second) == [
        ("distilsd train -c shapes-tiny-vae --max-steps 12000 -o runs/first", 12000),
        (
            "distilsd train -c shapes-tiny-vae --student runs/first --max-steps 5000 "
            "optim.learning_rate=0.0003 vae.edge_weight=1.0 -o runs/second",
            5000,
        ),
    ]


def test_crops_are_windows_of_the_teachers_whole_image_round_trip():
    """With vae.crop_size the teacher sees the whole image; the tiny VAE learns a window of its output.

    The Shapes VAE has attention and group norms: its round trip of a crop differs from the crop
    of its round trip, so crops taken before the teacher would teach the tiny VAE the wrong images.
    """
    import numpy as np
    from diffusers import AutoencoderKL

    from distilsd.distill.vae import tiny_vae_targets
    from distilsd.models import builtin_folder
    from distilsd.shapes.evaluate import heldout_scenes
    from distilsd.shapes.world import render

    vae = AutoencoderKL.from_pretrained(builtin_folder("shapes"), subfolder="vae").eval()
    images = [np.asarray(render(scene).convert("RGB"), dtype=np.float32) for scene in heldout_scenes(2, 4)]
    pixels = torch.from_numpy(np.stack(images) / 127.5 - 1.0).permute(0, 3, 1, 2)
    whole = tiny_vae_targets(vae, pixels, torch.Generator().manual_seed(0))
    crops = tiny_vae_targets(vae, pixels, torch.Generator().manual_seed(0), crop_size=32)
    factor = 64 // whole[1].shape[-1]
    assert [tuple(t.shape[-2:]) for t in crops] == [
        (32, 32),
        (32 // factor,) * 2,
        (32, 32),
        (32 // factor,) * 2,
    ]
    for i in range(len(pixels)):  # each crop is one grid-aligned window of all four whole-image tensors
        windows = [
            (top, left)
            for top in range(0, 33, factor)
            for left in range(0, 33, factor)
            if torch.equal(crops[1][i], whole[1][i, :, top // factor : (top + 32) // factor, left // factor : (left + 32) // factor])
        ]  # fmt: skip
        assert len(windows) >= 1
        top, left = windows[0]
        assert torch.equal(crops[0][i], whole[0][i, :, top : top + 32, left : left + 32])
        assert torch.equal(crops[2][i], whole[2][i, :, top : top + 32, left : left + 32])
        assert torch.equal(crops[3][i], whole[3][i, :, top // factor : (top + 32) // factor, left // factor : (left + 32) // factor])  # fmt: skip
    with torch.no_grad():  # what the teacher would have taught from the crop alone: a different image
        crop_round_trip = vae.decode(vae.encode(crops[0]).latent_dist.mean).sample.clamp(-1, 1)
    assert float((crop_round_trip - crops[2]).abs().mean()) * 127.5 > 1.0
