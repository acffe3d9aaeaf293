"""`distilsd generate` from the command line: features, metadata, resume, and every bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from distilsd.generate import parse_a1111_parameters, read_png_parameters


def test_generate_json_and_metadata(tiny_pipeline_dir, tmp_path, run_cli):
    code, out, err = run_cli(
        ["generate", "a red circle", "--model", str(tiny_pipeline_dir), "-o", str(tmp_path), "--steps", "2",
         "--seed", "3", "--negative", "blurry, dark", "--guidance", "5", "--scheduler", "euler", "--json", "-q"],
    )  # fmt: skip
    assert code == 0, err
    record = json.loads(out)["images"][0]
    assert record["path"] == str(tmp_path / "00000-00-a-red-circle.png")
    assert record["seed"] == 3 and record["scheduler"] == "euler" and not record["skipped"]
    text = read_png_parameters(record["path"])
    assert text.splitlines()[0] == "a red circle"
    assert text.splitlines()[1] == "Negative prompt: blurry, dark"
    fields = parse_a1111_parameters(text)
    assert fields["prompt"] == "a red circle"
    assert fields["negative_prompt"] == "blurry, dark"
    assert fields["Steps"] == "2" and fields["Sampler"] == "Euler" and fields["CFG scale"] == "5"
    assert fields["Seed"] == "3" and fields["Size"] == "64x64" and fields["Model"] == "pipeline"


def test_prompt_files_resume_and_overwrite(tiny_pipeline_dir, tmp_path, run_cli, expect_cli_error):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "a red circle", "name": "red"}\n{"prompt": "a blue square", "seed": 9, "negative_prompt": "green"}\n'
    )
    out_dir = tmp_path / "out"
    args = [
        "generate",
        "-f",
        str(prompts),
        "--model",
        str(tiny_pipeline_dir),
        "-o",
        str(out_dir),
        "--steps",
        "2",
        "--num-images",
        "2",
        "--json",
        "-q",
    ]
    code, out, err = run_cli(args)
    assert code == 0, err
    images = json.loads(out)["images"]
    assert [os.path.basename(r["path"]) for r in images] == [
        "red-00.png",
        "red-01.png",
        "00001-00-a-blue-square.png",
        "00001-01-a-blue-square.png",
    ]
    assert [r["seed"] for r in images] == [0, 1, 9, 10]
    assert images[2]["negative_prompt"] == "green"

    # A rerun skips what is there and makes only what is missing.
    os.remove(images[3]["path"])
    before = open(images[0]["path"], "rb").read()
    code, out, err = run_cli(args)
    assert code == 0, err
    assert [r["skipped"] for r in json.loads(out)["images"]] == [True, True, True, False]
    assert open(images[0]["path"], "rb").read() == before

    # Other parameters for the same names: refused unless --overwrite.
    expect_cli_error(
        args[:-2] + ["--steps", "3", "-q"], "exists and was made with other parameters", "--overwrite"
    )
    code, out, err = run_cli(args[:-2] + ["--steps", "3", "--overwrite", "-q"])
    assert code == 0, err

    text_prompts = tmp_path / "prompts.txt"
    text_prompts.write_text("# a comment\n\na green triangle\n")
    code, out, err = run_cli(
        [
            "generate",
            "-f",
            str(text_prompts),
            "--model",
            str(tiny_pipeline_dir),
            "-o",
            str(tmp_path / "txt"),
            "--steps",
            "1",
            "-q",
        ]
    )
    assert code == 0, err
    assert out.strip().endswith("00000-00-a-green-triangle.png")


def test_image_to_image_and_inpainting(tiny_pipeline_dir, tmp_path, run_cli):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(init)
    code, out, err = run_cli(
        [
            "generate",
            "a castle",
            "--model",
            str(tiny_pipeline_dir),
            "-o",
            str(tmp_path / "i2i"),
            "--init-image",
            str(init),
            "--strength",
            "0.5",
            "--steps",
            "4",
            "--json",
            "-q",
        ]
    )
    assert code == 0, err
    record = json.loads(out)["images"][0]
    assert Image.open(record["path"]).size == (96, 80)  # the init image's size
    assert "Denoising strength: 0.5" in read_png_parameters(record["path"])

    mask = tmp_path / "mask.png"
    mask_pixels = np.zeros((80, 96), dtype=np.uint8)
    mask_pixels[:, 48:] = 255
    Image.fromarray(mask_pixels).save(mask)
    code, out, err = run_cli(
        [
            "generate",
            "a castle",
            "--model",
            str(tiny_pipeline_dir),
            "-o",
            str(tmp_path / "inpaint"),
            "--init-image",
            str(init),
            "--mask",
            str(mask),
            "-W",
            "64",
            "-H",
            "64",
            "--steps",
            "4",
            "--strength",
            "1",
            "--json",
            "-q",
        ]
    )
    assert code == 0, err
    assert Image.open(json.loads(out)["images"][0]["path"]).size == (64, 64)


def test_unet_swap(tiny_pipeline_dir, tmp_path, run_cli):
    from distilsd.testing import tiny_unet

    other = tmp_path / "other-unet"
    tiny_unet(seed=1).save_pretrained(other)
    args = ["generate", "x", "--model", str(tiny_pipeline_dir), "--steps", "2", "--json", "-q"]
    _, out_base, _ = run_cli(args + ["-o", str(tmp_path / "base")])
    code, out_swap, err = run_cli(args + ["-o", str(tmp_path / "swap"), "--unet", str(other)])
    assert code == 0, err
    swapped = json.loads(out_swap)["images"][0]
    assert swapped["model"] == "pipeline+unet:other-unet"
    base_pixels = np.asarray(Image.open(json.loads(out_base)["images"][0]["path"]))
    assert not np.array_equal(base_pixels, np.asarray(Image.open(swapped["path"])))
    # a pipeline folder given as --unet uses its unet/
    code, _, err = run_cli(args + ["-o", str(tmp_path / "swap2"), "--unet", str(tiny_pipeline_dir)])
    assert code == 0, err


def test_safety_checker_runs_unless_disabled(tiny_pipeline_with_checker_dir, tmp_path, run_cli):
    from distilsd.generate import load_pipeline

    loaded = load_pipeline(str(tiny_pipeline_with_checker_dir), device="cpu")
    assert loaded.pipeline.safety_checker is not None
    assert (
        load_pipeline(
            str(tiny_pipeline_with_checker_dir), device="cpu", safety_checker=False
        ).pipeline.safety_checker
        is None
    )

    # A checker that flags everything: the image is blacked out and reported.
    flagging = tmp_path / "flagging"
    shutil.copytree(tiny_pipeline_with_checker_dir, flagging)
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    checker = StableDiffusionSafetyChecker.from_pretrained(flagging / "safety_checker")
    checker.concept_embeds_weights.data.fill_(-2.0)
    checker.save_pretrained(flagging / "safety_checker")
    code, out, err = run_cli(
        [
            "generate",
            "x",
            "--model",
            str(flagging),
            "-o",
            str(tmp_path / "flagged"),
            "--steps",
            "1",
            "--json",
            "-q",
        ]
    )
    assert code == 0, err
    record = json.loads(out)["images"][0]
    assert record["nsfw"] is True and "flagged" in err
    assert np.asarray(Image.open(record["path"])).max() == 0
    code, out, err = run_cli(
        [
            "generate",
            "x",
            "--model",
            str(flagging),
            "-o",
            str(tmp_path / "unchecked"),
            "--steps",
            "1",
            "--json",
            "-q",
            "--no-safety-checker",
        ]
    )
    record = json.loads(out)["images"][0]
    assert record["nsfw"] is False and np.asarray(Image.open(record["path"])).max() > 0


def test_memory_options_and_bf16(tiny_pipeline_dir, tmp_path, run_cli):
    code, out, err = run_cli(
        ["generate", "x", "--model", str(tiny_pipeline_dir), "-o", str(tmp_path), "--steps", "1", "--dtype", "bf16",
         "--attention-slicing", "--vae-slicing", "--vae-tiling", "--channels-last", "--batch-size", "2", "--num-images", "2", "-q"],
    )  # fmt: skip
    assert code == 0, err
    assert len(out.split()) == 2


def test_schedulers_command(run_cli):
    code, out, _ = run_cli(["schedulers"])
    assert code == 0
    for name in [
        "pndm",
        "ddim",
        "dpm++",
        "dpm++-sde",
        "dpm++-2s",
        "euler",
        "euler-a",
        "lms",
        "heun",
        "unipc",
        "lcm",
    ]:
        assert name in out
    code, out, _ = run_cli(["generate", "--help"])
    assert "dpm++-2s" in out and "unipc" in out


# ---- bad input: one line, non-zero exit, nothing written --------------------------------------


def test_bad_sizes_steps_guidance(tiny_pipeline_dir, tmp_path, expect_cli_error):
    base = ["generate", "x", "--model", str(tiny_pipeline_dir), "-o", str(tmp_path / "o")]
    expect_cli_error(base + ["--width", "100"], "--width 100 is not a multiple of 8")
    expect_cli_error(base + ["--height", "8192"], "--height 8192 is outside")
    expect_cli_error(base + ["--steps", "0"], "--steps 0 must be between 1")
    expect_cli_error(base + ["--guidance", "-1"], "--guidance -1.0 must be a finite number >= 0")
    expect_cli_error(base + ["--strength", "1.5"], "--strength 1.5")
    expect_cli_error(["generate", "--model", str(tiny_pipeline_dir)], "no prompt given")
    assert not (tmp_path / "o").exists()


def test_bad_prompt_files(tmp_path, expect_cli_error):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    expect_cli_error(["generate", "-f", str(empty)], "has no prompts")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"prompt": \n')
    expect_cli_error(["generate", "-f", str(broken)], "broken.jsonl:2", "not valid JSON")
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"seed": 1}\n')
    expect_cli_error(["generate", "-f", str(missing)], "missing or empty 'prompt'")
    escape = tmp_path / "escape.jsonl"
    escape.write_text('{"prompt": "x", "name": "../evil"}\n')
    expect_cli_error(["generate", "-f", str(escape)], "not a safe file name")
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"prompt": "x", "name": "a"}\n{"prompt": "y", "name": "a"}\n')
    expect_cli_error(["generate", "-f", str(dup)], "more than once")


def test_bad_models(tiny_pipeline_dir, tmp_path, expect_cli_error):
    out = ["-o", str(tmp_path / "o"), "--steps", "1"]
    expect_cli_error(["generate", "x", "--model", str(tmp_path / "nope")] + out, "does not exist")
    expect_cli_error(
        ["generate", "x", "--model", str(tiny_pipeline_dir / "unet")] + out,
        "not a diffusers pipeline folder",
        "--unet",
    )
    # a U-Net whose cross-attention width does not match the text encoder
    from distilsd.testing import tiny_unet

    wide = tmp_path / "wide-unet"
    tiny_unet(cross_attention_dim=48).save_pretrained(wide)
    expect_cli_error(
        ["generate", "x", "--model", str(tiny_pipeline_dir), "--unet", str(wide)] + out,
        "cross_attention_dim is 48",
        "32-wide",
    )
    # pickles are refused without --allow-pickle, before anything is unpickled
    for suffix in (".ckpt", ".bin", ".pt"):
        pickle = tmp_path / f"model{suffix}"
        pickle.write_bytes(b"not even a real pickle")
        expect_cli_error(
            ["generate", "x", "--model", str(pickle)] + out, "pickled checkpoint", "--allow-pickle"
        )
    pickled_folder = tmp_path / "pickled"
    shutil.copytree(tiny_pipeline_dir, pickled_folder)
    for weights in pickled_folder.rglob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    expect_cli_error(
        ["generate", "x", "--model", str(pickled_folder)] + out, "only pickled weights", "--allow-pickle"
    )
    expect_cli_error(
        ["generate", "x", "--model", str(tiny_pipeline_dir), "--dtype", "fp16", "--device", "cpu"] + out,
        "fp16 is not supported on the CPU",
    )


def test_bad_images_and_output(tiny_pipeline_dir, tmp_path, expect_cli_error):
    base = ["generate", "x", "--model", str(tiny_pipeline_dir), "--steps", "1"]
    not_image = tmp_path / "init.png"
    not_image.write_text("hello")
    expect_cli_error(
        base + ["-o", str(tmp_path / "o"), "--init-image", str(not_image)], "cannot be read as an image"
    )
    init = tmp_path / "real.png"
    Image.new("RGB", (64, 64)).save(init)
    mask = tmp_path / "mask.png"
    Image.new("L", (32, 48)).save(mask)
    expect_cli_error(
        base + ["-o", str(tmp_path / "o"), "--init-image", str(init), "--mask", str(mask)],
        "mask is 32x48",
        "refusing to stretch",
    )
    expect_cli_error(base + ["-o", str(tmp_path / "o"), "--mask", str(mask)], "--mask needs --init-image")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    expect_cli_error(base + ["-o", str(blocker / "sub")], "cannot write to the output folder")


@pytest.mark.slow
def _restore_default_sigint():
    # A shell starts background jobs (a CI runner's, `cmd &`) with SIGINT ignored, the child
    # inherits that, and Python then installs no KeyboardInterrupt handler: Ctrl-C would be a
    # no-op. Give the child the SIGINT a terminal user's process has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_keeps_finished_images_and_no_partial(tiny_pipeline_dir, tmp_path):
    out_dir = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "distilsd", "generate", "x", "--model", str(tiny_pipeline_dir), "-o", str(out_dir),
         "--num-images", "2000", "--steps", "2", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_restore_default_sigint,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(out_dir.glob("*.png"))) < 2:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    pngs = sorted(out_dir.glob("*.png"))
    assert 2 <= len(pngs) < 2000
    assert not [p for p in out_dir.iterdir() if p.suffix != ".png"]  # no temp files left
    for png in pngs:
        Image.open(png).load()  # every file that is there is complete


def test_hub_id_offline_is_one_clear_line(tiny_pipeline_dir, tmp_path, expect_cli_error):
    # conftest sets HF_HUB_OFFLINE=1: the hub path is the real one, and fails cleanly.
    out = ["-o", str(tmp_path / "o"), "--steps", "1"]
    expect_cli_error(
        ["generate", "x", "--model", "nota-ai/bk-sdm-tiny"] + out,
        "could not load 'nota-ai/bk-sdm-tiny' from the Hugging Face hub",
    )
    expect_cli_error(
        ["generate", "x", "--model", str(tiny_pipeline_dir), "--unet", "nota-ai/bk-sdm-tiny"] + out,
        "from the Hugging Face hub",
    )


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, caplog):
    import torch

    from distilsd import models as loading

    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    assert loading.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert "no native bf16" in caplog.text
    caplog.clear()
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    loading.resolve_dtype("bf16", torch.device("cpu"))
    assert "no native bf16" not in caplog.text


def test_zero_snr_model_refuses_a_scheduler_that_drops_it(
    tiny_pipeline_dir, tmp_path, run_cli, expect_cli_error
):
    """PNDM has no rescale_betas_zero_snr: it would sample a zero-SNR model (Shapes) with other betas."""
    model = tmp_path / "zero-snr"
    shutil.copytree(tiny_pipeline_dir, model)
    config_file = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    config_file.write_text(json.dumps(config))
    expect_cli_error(
        ["generate", "x", "--model", str(model), "--scheduler", "pndm", "--steps", "2", "-o", str(tmp_path / "a")],
        "scheduler 'pndm' cannot follow", "euler",
    )  # fmt: skip
    code, _, err = run_cli(["generate", "x", "--model", str(model), "--scheduler", "euler", "--steps", "2",
                            "-o", str(tmp_path / "b"), "-q"])  # fmt: skip
    assert code == 0, err


def test_a_prompt_past_the_text_encoders_window_is_named_once(tiny_pipeline_dir, tmp_path, run_cli):
    long_prompt = "a red circle above a blue square " * 12  # 84 CLIP tokens + start and end
    code, _, err = run_cli(
        ["generate", long_prompt, "--model", str(tiny_pipeline_dir), "-o", str(tmp_path), "--steps", "1",
         "--num-images", "2", "-q"]
    )  # fmt: skip
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, err  # once for the prompt, not once per image
    assert warnings[0].endswith(
        "is 86 tokens long; the text encoder reads 77, so its last 9 tokens are dropped "
        "('blue square a red circle above a blue square')"
    )


def test_failed_runs_leave_no_output_folder(tiny_pipeline_dir, pickle_only_pipeline_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    for args in (
        ["generate", "x", "-m", "/nonexistent", "-o", str(out)],
        ["generate", "x", "-m", str(pickle_only_pipeline_dir), "-o", str(out)],
        ["generate", "x", "-m", str(tiny_pipeline_dir), "--unet", "/nonexistent", "-o", str(out)],
        ["generate", "x", "-m", str(tiny_pipeline_dir), "--init-image", "/nonexistent.png", "-o", str(out)],
        ["eval", "generate", "-m", "/nonexistent", "-p", str(_captions(tmp_path)), "-o", str(out)],
        [
            "eval",
            "generate",
            "-m",
            str(pickle_only_pipeline_dir),
            "-p",
            str(_captions(tmp_path)),
            "-o",
            str(out),
        ],
    ):
        code, _, err = run_cli(args)
        assert code == 2 and err.startswith("error: "), (args, err)
        assert not out.exists(), (args, sorted(p.name for p in out.rglob("*")))
    # The folder appears with the first image.
    code, _, err = run_cli(
        ["generate", "x", "-m", str(tiny_pipeline_dir), "-o", str(out / "a" / "b"), "--steps", "1", "-q"]
    )
    assert code == 0, err
    assert [p.name for p in (out / "a" / "b").iterdir()] == ["00000-00-x.png"]


def _captions(folder):
    path = folder / "metadata.csv"
    path.write_text("file_name,text\na.jpg,a cat\n")
    return path
