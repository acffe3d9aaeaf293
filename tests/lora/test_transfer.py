"""`distilsd lora transfer`: a teacher's LoRA onto its compressed student through the compression mapping."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file


@pytest.mark.slow
def test_transfer_keeps_the_adapters_of_kept_blocks(
    tiny_pipeline_dir, unet_lora_run, tmp_path, run_cli, expect_cli_error
):
    student = tmp_path / "student"
    code, _, err = run_cli(
        [
            "compress",
            "--teacher",
            str(tiny_pipeline_dir),
            "--arch",
            "bk-tiny",
            "-o",
            str(student),
            "--pipeline",
        ]
    )
    assert code == 0, err
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
