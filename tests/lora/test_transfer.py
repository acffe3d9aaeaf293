"""`distilsd lora transfer`: a teacher's LoRA onto its compressed student through the compression mapping."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file


def compressed_student(run_cli, teacher, folder):
    """The bk-tiny student of ``teacher`` (a pipeline folder, with distilsd_compress.json)."""
    code, _, err = run_cli(
        ["compress", "--teacher", str(teacher), "--arch", "bk-tiny", "-o", str(folder), "--pipeline"]
    )
    assert code == 0, err
    return folder


@pytest.mark.slow
def test_transfer_keeps_the_adapters_of_kept_blocks(
    tiny_pipeline_dir, unet_lora_run, tmp_path, run_cli, expect_cli_error
):
    student = compressed_student(run_cli, tiny_pipeline_dir, tmp_path / "student")
    out = tmp_path / "moved"
    code, stdout, err = run_cli(
        ["lora", "transfer", "--lora", str(unet_lora_run), "--student", str(student), "-o", str(out)]
    )
    assert code == 0, err
    report = json.loads(stdout)
    # bk-tiny drops the mid block and one of two resnet+attention pairs per down level.
    assert report["kept_modules"] > 0 and report["dropped_modules"] > 0
    assert 0 < report["kept_share"] < 1
    assert any(name.startswith("mid_block.") for name in report["dropped"])
    record = json.loads((student / "unet" / "distilsd_compress.json").read_text())["mapping"]
    moved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    teacher = load_file(str(unet_lora_run / "pytorch_lora_weights.safetensors"))
    for key, tensor in moved.items():
        module = key.removeprefix("unet.").rsplit(".lora.", 1)[0]
        source = record[f"{module}.weight"].removesuffix(".weight")
        assert (teacher[key.replace(module, source, 1)] == tensor).all(), key
    code, _, err = run_cli(
        [
            "generate",
            "a red circle",
            "-m",
            str(student),
            "--lora",
            str(out),
            "-o",
            str(tmp_path / "img"),
            "--steps",
            "1",
            "-q",
        ]
    )
    assert code == 0, err
    expect_cli_error(
        [
            "lora",
            "transfer",
            "--lora",
            str(unet_lora_run),
            "--student",
            str(tiny_pipeline_dir),
            "-o",
            str(tmp_path / "x"),
        ],
        "has no compression mapping",
        "distilsd compress",
    )


@pytest.mark.slow
def test_transfer_steps_adapt_the_students_lora_to_teacher_plus_lora(
    tiny_pipeline_dir, lora_data_dir, tmp_path, run_cli, expect_cli_error
):
    """`--steps N`: the student's LoRA learns to match teacher + LoRA; the KD loss falls, the file loads."""
    from distilsd.testing import save_random_lora

    teacher_lora = save_random_lora(
        tiny_pipeline_dir, tmp_path / "teacher-lora" / "pytorch_lora_weights.safetensors", seed=4, std=0.3
    )
    student = compressed_student(run_cli, tiny_pipeline_dir, tmp_path / "student")
    out = tmp_path / "adapted"
    common = ["lora", "transfer", "--lora", str(teacher_lora), "--student", str(student), "-o", str(out)]
    expect_cli_error([*common, "--steps", "3"], "--steps needs --teacher, --data, --prompt")
    expect_cli_error(
        [*common, "--teacher", str(tiny_pipeline_dir)], "--teacher is for the adaptation run", "--steps"
    )
    code, stdout, err = run_cli(
        [*common, "--steps", "12", "--teacher", str(tiny_pipeline_dir), "--data", str(lora_data_dir),
         "--prompt", "a sks shape", "--learning-rate", "3e-3", "--batch-size", "4", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0, err
    adaptation = json.loads(stdout)["adaptation"]
    assert adaptation["steps"] == 12 and adaptation["images"] == 8 and len(adaptation["step_losses"]) == 12
    assert adaptation["kd_loss_after"] < 0.9 * adaptation["kd_loss_before"], adaptation
    record = json.loads((out / "lora_transfer.json").read_text())
    assert record["adaptation"]["kd_loss_after"] == adaptation["kd_loss_after"] and record["kept_modules"] > 0
    # Only the U-Net adapters of modules the student kept, each trained away from its copy.
    adapted = load_file(str(out / "pytorch_lora_weights.safetensors"))
    copied_dir = tmp_path / "copied"
    code, _, err = run_cli([*common[:-1], str(copied_dir)])
    assert code == 0, err
    copied = load_file(str(copied_dir / "pytorch_lora_weights.safetensors"))
    assert set(adapted) == set(copied)
    assert any(not (adapted[key] == copied[key]).all() for key in copied)
    code, _, err = run_cli(
        ["generate", "a sks shape", "-m", str(student), "--lora", f"{out}:0.8", "-o", str(tmp_path / "img"), "--steps", "2", "-q"]
    )  # fmt: skip
    assert code == 0, err
    assert list((tmp_path / "img").glob("*.png"))
