"""`distilsd compress` and `distilsd arch` end to end on tiny pipelines, and every bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from distilsd.cli import main


def run(args, capsys):
    """Run the CLI entry point; return (exit code, stdout, stderr)."""
    code = 0
    try:
        main(list(map(str, args)))
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_unet_dir(tmp_path_factory):
    from distilsd.testing import tiny_unet

    path = tmp_path_factory.mktemp("tiny-unet") / "unet"
    tiny_unet(seed=0).save_pretrained(path)
    return path


def test_compress_unet_folder(tmp_path, tiny_pipeline_dir, capsys):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "student"
    code, stdout, stderr = run(
        ["compress", "--teacher", tiny_pipeline_dir, "--arch", "bk-tiny", "-o", out], capsys
    )
    assert code == 0, stderr
    assert "wrote bk-tiny student U-Net" in stdout
    student = UNet2DConditionModel.from_pretrained(out)
    teacher = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    record = json.loads((out / "distilsd_compress.json").read_text())
    assert record["arch"] == "bk-tiny" and record["init"] == "teacher"
    assert record["student_params"] == sum(p.numel() for p in student.parameters())
    assert "down_blocks.3" in record["removed_blocks"]
    assert record["feature_pairs"][2] == [
        "down_blocks.2.attentions.1.proj_out",
        "down_blocks.2.attentions.0.proj_out",
    ]
    teacher_state = teacher.state_dict()
    for student_name, tensor in student.state_dict().items():
        assert torch.equal(tensor, teacher_state[record["mapping"][student_name]])
    # the folder holds only the finished result (no temporary folders left beside it)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_dry_run_prints_mapping_and_writes_nothing(tmp_path, tiny_pipeline_dir, capsys):
    code, stdout, _ = run(
        ["compress", "-t", tiny_pipeline_dir, "-a", "bk-base", "--dry-run", "-o", tmp_path / "x"], capsys
    )
    assert code == 0
    assert (
        "up_blocks.1.resnets.1.conv1.weight" in stdout and "<- up_blocks.1.resnets.2.conv1.weight" in stdout
    )
    assert not (tmp_path / "x").exists()
    # sd-v1 (architecture only) works for a dry run, and as JSON
    code, stdout, _ = run(["compress", "-t", "sd-v1", "-a", "sd_tiny", "--dry-run", "--json"], capsys)
    assert code == 0
    record = json.loads(stdout)
    assert record["student_params"] == 323_384_964
    assert record["mapping"]["up_blocks.0.resnets.1.conv1.weight"] == "up_blocks.1.resnets.2.conv1.weight"
    # A built-in model by name; its shipped student carries the same record (for `lora transfer`).
    code, stdout, _ = run(["compress", "-t", "shapes", "-a", "bk-tiny", "--dry-run", "--json"], capsys)
    assert code == 0
    from distilsd.lora.transfer import compression_mapping

    shipped = compression_mapping("shapes-tiny")
    assert {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in json.loads(stdout)["mapping"].items()
            if k.endswith(".weight")} == shipped  # fmt: skip


def test_compress_pipeline_loads_in_diffusers_and_generates(tmp_path, tiny_pipeline_dir, capsys):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "pipe"
    code, stdout, stderr = run(
        ["compress", "-t", tiny_pipeline_dir, "-a", "bk-small", "-o", out, "--pipeline"], capsys
    )
    assert code == 0, stderr
    assert (out / "unet" / "distilsd_compress.json").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.unet.config.mid_block_type is None and pipe.unet.config.layers_per_block == 1
    image = pipe(
        "a red apple",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 64, 3)
    # and distilsd's own generate command runs it
    code, _, stderr = run(
        [
            "generate",
            "a red apple",
            "--model",
            out,
            "--steps",
            "2",
            "-W",
            "64",
            "-H",
            "64",
            "-q",
            "-o",
            tmp_path / "images",
        ],
        capsys,
    )
    assert code == 0, stderr
    assert len(list((tmp_path / "images").glob("*.png"))) == 1


def test_random_init_from_architecture_preset(tmp_path, capsys):
    """sd-v2 + --init random: a full-size student from config alone (checked: config, not weights)."""
    out = tmp_path / "random"
    code, stdout, stderr = run(
        ["compress", "-t", "sd-v1", "-a", "bk-tiny", "--init", "random", "-o", out, "--dry-run"], capsys
    )
    assert code == 0 and "random init" in stdout


def test_random_init_from_tiny_teacher(tmp_path, tiny_v2_pipeline_dir, capsys):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "random"
    code, _, stderr = run(
        [
            "compress",
            "-t",
            tiny_v2_pipeline_dir / "unet",
            "-a",
            "bk-base",
            "--init",
            "random",
            "--seed",
            "1",
            "-o",
            out,
        ],
        capsys,
    )
    assert code == 0, stderr
    record = json.loads((out / "distilsd_compress.json").read_text())
    assert record["init"] == "random" and record["mapping"] == {}
    assert UNet2DConditionModel.from_pretrained(out).config.cross_attention_dim == 48


def test_overwrite(tmp_path, tiny_unet_dir, capsys):
    out = tmp_path / "student"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, stderr = run(["compress", "-t", tiny_unet_dir, "-a", "bk-base", "-o", out], capsys)
    assert code == 2 and "already exists" in stderr and "--overwrite" in stderr
    code, _, stderr = run(
        ["compress", "-t", tiny_unet_dir, "-a", "bk-base", "-o", out, "--overwrite"], capsys
    )
    assert code == 0, stderr
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()


def test_arch_json_on_a_tiny_teacher(tiny_pipeline_dir, capsys):
    code, stdout, stderr = run(["arch", "-t", tiny_pipeline_dir, "-a", "bk-tiny", "--json"], capsys)
    assert code == 0, stderr
    data = json.loads(stdout)
    assert [m["name"] for m in data["models"]] == [str(tiny_pipeline_dir), "bk-tiny"]
    assert data["resolution"] == [64, 64]
    teacher, tiny = data["models"]
    assert teacher["unet_params"] > tiny["unet_params"]
    assert "down_blocks.3" in tiny["removed_blocks"] and tiny["layout"]["drop_stages"] == 1
    assert teacher["text_encoder_params"] > 0 and teacher["pipeline_params"] > teacher["unet_params"]
    assert tiny["feature_pairs"][3] == ["up_blocks.1", "up_blocks.0"]
    assert all(m["macs"] > 0 and m["attention_macs"] > 0 for m in data["models"])


def test_arch_table(tiny_pipeline_dir, capsys):
    code, stdout, _ = run(["arch", "-t", tiny_pipeline_dir, "-a", "sd_small"], capsys)
    assert code == 0
    assert "MACs per U-Net forward at 64x64 px, batch 1" in stdout
    assert "== bk-base (student) ==" in stdout and "removed from the teacher:" in stdout


@pytest.fixture(scope="module")
def bad_spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("specs") / "bad.yaml"
    path.write_text("down_layers: [[0], [0], [0], [0]]\nup_layers: [[0, 1, 2], [0, 2], [0, 2], [0, 2]]\n")
    return path


@pytest.fixture(scope="module")
def pickled_unet_dir(tmp_path_factory, tiny_unet_dir):
    path = tmp_path_factory.mktemp("pickled") / "unet"
    path.mkdir()
    shutil.copy(tiny_unet_dir / "config.json", path / "config.json")
    (path / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    return path


BAD_INPUTS = [
    (["-a", "bk-huge"], "unknown student architecture 'bk-huge'"),
    (["-a", "ofa-small"], "not a preset"),
    (["-a", "{bad_spec}"], "up_blocks.0 keeps 3 layers"),
    (["-a", "{missing_spec}"], "layout spec file not found"),
    (["-a", "bk-base", "-t", "{vae_dir}"], "not a UNet2DConditionModel"),
    (["-a", "bk-base", "-t", "{nowhere}"], "not found"),
    (["-a", "bk-base", "-t", "sd-v1"], "architecture preset without weights"),
    (["-a", "bk-base", "-t", "no-such-org/no-such-model"], "cannot read the U-Net config of hub model"),
    (["-a", "bk-base", "-t", "{pickled}"], "only pickled weights"),
    (["-a", "bk-base", "-t", "{unet_dir}", "--pipeline"], "--pipeline needs a whole teacher pipeline"),
    (["-a", "bk-base", "-o", "{existing}"], "already exists"),
    (["-a", "bk-base", "-o", "{teacher}", "--overwrite"], "would replace the teacher"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_inputs_one_line_no_traceback(
    args, message, tmp_path, tiny_pipeline_dir, tiny_unet_dir, bad_spec, pickled_unet_dir, capsys
):
    existing = tmp_path / "existing"
    existing.mkdir()
    values = {
        "bad_spec": bad_spec,
        "missing_spec": tmp_path / "missing.yaml",
        "vae_dir": tiny_pipeline_dir / "vae",
        "nowhere": tmp_path / "nowhere",
        "pickled": pickled_unet_dir,
        "unet_dir": tiny_unet_dir,
        "existing": existing,
        "teacher": tiny_pipeline_dir,
    }
    args = [str(a).format(**values) for a in args]
    if "-t" not in args:
        args += ["-t", str(tiny_pipeline_dir)]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out")]
    code, stdout, stderr = run(["compress", *args], capsys)
    assert code == 2
    assert stderr.startswith("error: ") and message in stderr.splitlines()[0]
    assert "Traceback" not in stderr and stdout == ""
    assert not (tmp_path / "out").exists()
    assert (tiny_pipeline_dir / "unet" / "config.json").is_file()  # the teacher is untouched


def test_arch_bad_preset(capsys):
    code, _, stderr = run(["arch", "-a", "bk-huge"], capsys)
    assert code == 2 and "unknown student architecture" in stderr and "Traceback" not in stderr


def test_help_lists_presets(capsys):
    code, stdout, _ = run(["compress", "--help"], capsys)
    assert code == 0 and "bk-tiny" in stdout and "sd-tiny" in stdout
