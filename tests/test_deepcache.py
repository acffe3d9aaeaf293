"""DeepCache: the deep U-Net blocks run on one call in N and replay their output in between."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distilsd.deepcache import disable_deepcache, enable_deepcache


def _image(pipe, steps=6):
    generator = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=steps, guidance_scale=4.5, generator=generator,
                output_type="np").images  # fmt: skip


@pytest.fixture(scope="module")
def pipe():
    from distilsd.generate import load_pipeline

    pipeline = load_pipeline("shapes-tiny", device="cpu").pipeline  # bk-tiny: no mid block
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_interval_one_is_the_plain_u_net_and_disable_restores_it(pipe):
    plain = _image(pipe)
    state = enable_deepcache(pipe.unet, 1)
    assert np.array_equal(_image(pipe), plain) and (state.full_calls, state.cached_calls) == (6, 0)
    enable_deepcache(pipe.unet, 3)
    cached = _image(pipe)
    disable_deepcache(pipe.unet)
    assert np.array_equal(_image(pipe), plain)
    assert not np.array_equal(cached, plain)
    # The image stays the same picture: cached steps move it only a little.
    assert np.abs(cached - plain).mean() < 0.1


def test_every_generation_starts_with_a_full_call(pipe):
    state = enable_deepcache(pipe.unet, 4)
    first = _image(pipe)
    assert (state.full_calls, state.cached_calls) == (2, 4)  # calls 0 and 4 of 6
    assert np.array_equal(_image(pipe), first)  # no cache carried over from the last image
    assert (state.full_calls, state.cached_calls) == (4, 8)
    disable_deepcache(pipe.unet)


def test_generate_deepcache_flag(tmp_path, run_cli, expect_cli_error):
    code, out, err = run_cli(["generate", "a red circle", "--steps", "4", "--deepcache", "2", "-o", str(tmp_path),
                              "-q", "--device", "cpu", "--json"])  # fmt: skip
    assert code == 0, err
    import json

    (record,) = json.loads(out)["images"]
    assert "deepcache:2" in json.dumps(record)
    expect_cli_error(
        ["generate", "a red circle", "--deepcache", "0", "-o", str(tmp_path)],
        "--deepcache must be at least 1",
    )
    expect_cli_error(["generate", "a red circle", "--deepcache", "2", "--backend", "onnx", "-o", str(tmp_path)],
                     "--deepcache works with the PyTorch backend only")  # fmt: skip
