"""Parameter and MAC counts of SD v1 and the BK-SDM students (the numbers of the BK-SDM paper)."""

from __future__ import annotations

import json

import pytest

from distilsd.compress import describe_architecture

UNET_PARAMS = {"sd-v1": 859_520_964, "bk-base": 579_384_964, "bk-small": 482_346_884, "bk-tiny": 323_384_964}
# U-Net MACs per forward at 512 px, batch 1, convs + linears (BK-SDM, thop).
MACS = {"sd-v1": 338.75e9, "bk-base": 223.76e9, "bk-small": 217.73e9, "bk-tiny": 205.04e9}


@pytest.fixture(scope="module")
def sd_v1_report():
    return describe_architecture("sd-v1", ["bk-base", "bk-small", "bk-tiny"])


def test_unet_params_exact(sd_v1_report):
    assert {m.name: m.unet_params for m in sd_v1_report.models} == UNET_PARAMS


def test_macs_within_half_a_percent(sd_v1_report):
    assert sd_v1_report.resolution == (512, 512)
    for model in sd_v1_report.models:
        assert abs(model.macs - MACS[model.name]) / MACS[model.name] < 0.005, model.name


def test_attention_macs_are_counted_separately(sd_v1_report):
    attention = {m.name: m.attention_macs for m in sd_v1_report.models}
    # BK-SDM: "attention matmuls add about 63G (SD) and 38G (students)".
    assert attention["sd-v1"] == pytest.approx(63e9, rel=0.02)
    for name in ("bk-base", "bk-small", "bk-tiny"):
        assert attention[name] == pytest.approx(38e9, rel=0.02)
    for model in sd_v1_report.models:
        assert model.total_macs == model.macs + model.attention_macs


def test_pipeline_params(sd_v1_report):
    teacher = sd_v1_report.models[0]
    assert teacher.text_encoder_params == 123_060_480
    assert teacher.vae_params == 83_653_863
    assert teacher.vae_decoder_params == 49_490_179
    assert teacher.inference_params == 123_060_480 + 859_520_964 + 49_490_179


def test_blocks_add_up(sd_v1_report):
    for model in sd_v1_report.models:
        assert sum(b.params for b in model.blocks) == model.unet_params
        assert sum(b.macs for b in model.blocks) == pytest.approx(model.macs, rel=1e-6)
    tiny = sd_v1_report.models[-1]
    assert [b.name for b in tiny.blocks if b.name.startswith(("down", "up", "mid"))] == [
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2",
        "up_blocks.0",
        "up_blocks.1",
        "up_blocks.2",
    ]
    matched = {b.name: b.matched_to for b in tiny.blocks}
    assert matched["up_blocks.0"] == "up_blocks.1"
    assert matched["down_blocks.2"].startswith("down_blocks.2.attentions.1.proj_out")
    assert "down_blocks.3" in tiny.removed_blocks and "mid_block" in tiny.removed_blocks


def test_report_json_and_table(sd_v1_report):
    data = json.loads(json.dumps(sd_v1_report.to_dict()))
    assert [m["name"] for m in data["models"]] == list(UNET_PARAMS)
    assert "FlopCounterMode" in data["macs_counting"]
    table = sd_v1_report.format_table()
    assert "859,520,964" in table and "323,384,964" in table and "MACs attn" in table


def test_sd_v2_params_from_shipped_configs():
    from distilsd.compress.analysis import component_parameters, count_parameters
    from distilsd.compress.teacher import empty_unet, load_preset

    preset = load_preset("sd-v2")
    assert count_parameters(empty_unet(preset["unet"])) == 865_910_724
    text_encoder, vae, decoder = component_parameters(preset)
    # OpenCLIP ViT-H/14 text tower as SD 2.x ships it (23 layers, 1024 wide), built on meta.
    assert text_encoder == 340_387_840
    assert (vae, decoder) == (83_653_863, 49_490_179)
