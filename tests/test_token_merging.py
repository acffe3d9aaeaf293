"""Token merging (tomesd): reproducible, off at ratio 0, PyTorch only, bad ratios refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _image(pipe, seed=0):
    return pipe("a red circle", num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images[0]  # fmt: skip


def test_merging_changes_the_image_reproducibly_and_comes_off(tiny_pipeline_dir):
    from distilsd.generate import load_pipeline
    from distilsd.token_merging import disable_token_merging, enable_token_merging

    pipe = load_pipeline(str(tiny_pipeline_dir), device="cpu").pipeline
    pipe.set_progress_bar_config(disable=True)
    plain = _image(pipe)
    enable_token_merging(pipe.unet, 0.0)
    assert np.abs(_image(pipe) - plain).max() < 1e-5  # nothing merged: the same image
    enable_token_merging(pipe.unet, 0.5)
    merged = _image(pipe)
    torch.manual_seed(123)  # the global generator must not matter (seeded images reproduce)
    assert np.abs(merged - plain).max() > 1e-4 and np.array_equal(_image(pipe), merged)
    disable_token_merging(pipe.unet)
    assert np.abs(_image(pipe) - plain).max() < 1e-5


def test_generate_tome_names_it_and_refuses_what_it_cannot_do(tiny_pipeline_dir, tmp_path, run_cli,
                                                              expect_cli_error):  # fmt: skip
    from distilsd.generate import load_pipeline

    assert load_pipeline(str(tiny_pipeline_dir), device="cpu", tome=0.5).name.endswith("+tome:0.5")
    code, out, err = run_cli(["generate", "a red circle", "-m", str(tiny_pipeline_dir), "--tome", "0.5",
                              "--steps", "2", "-o", str(tmp_path / "out"), "-q", "--device", "cpu"])  # fmt: skip
    assert code == 0, err
    base = ["generate", "a red circle", "-m", str(tiny_pipeline_dir), "-o", str(tmp_path / "bad")]
    expect_cli_error([*base, "--tome", "0.9"], "must be between 0 and 0.75")
    expect_cli_error([*base, "--tome", "0.5", "--backend", "onnx"], "--tome works with the PyTorch backend only")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("row, message", [("sd-v1 tome=0.9", "tome must be a number in (0, 0.75]"),
                                          ("sd-v1 tome=0.5 backend=onnx", "tome needs backend=pytorch")])  # fmt: skip
def test_bench_rows_check_tome(row, message, expect_cli_error):
    expect_cli_error(["bench", "--row", row], message)
