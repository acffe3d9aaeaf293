"""Students built from the shipped SD configs have exactly the official BK-SDM architectures.

The official configs (tests/compress/data/bk_sdm, see SOURCE.md there) are those of the
nota-ai/bk-sdm-* checkpoints: equal state_dict names and shapes mean those checkpoints load
into our students with no missing/unexpected key and no shape mismatch. Everything is built
on the meta device: no weights, no memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distilsd.compress import get_layout, student_config
from distilsd.compress.teacher import empty_unet, load_preset

DATA = Path(__file__).parent / "data" / "bk_sdm"

# (shipped teacher preset, official config file, our preset)
CASES = [
    ("sd-v1", "v1_bk_base.json", "bk-base"),
    ("sd-v1", "v1_bk_small.json", "bk-small"),
    ("sd-v1", "v1_bk_tiny.json", "bk-tiny"),
    ("sd-v2", "v2_bk_base.json", "bk-base"),
    ("sd-v2", "v2_bk_small.json", "bk-small"),
    ("sd-v2", "v2_bk_tiny.json", "bk-tiny"),
    # SD 2.1-base students: same tensors as SD 2.1 (only sample_size/upcast_attention differ).
    ("sd-v2", "v2-base_bk_base.json", "bk-base"),
    ("sd-v2", "v2-base_bk_small.json", "bk-small"),
    ("sd-v2", "v2-base_bk_tiny.json", "bk-tiny"),
]


def shapes(config: dict) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in empty_unet(config).state_dict().items()}


@pytest.mark.parametrize(("teacher", "official", "arch"), CASES)
def test_student_has_official_architecture(teacher, official, arch):
    teacher_config = load_preset(teacher)["unet"]
    official_config = json.loads((DATA / official).read_text())
    ours = shapes(student_config(teacher_config, get_layout(arch, teacher_config)))
    theirs = shapes(official_config)
    assert sorted(set(theirs) - set(ours)) == []  # would be "missing keys" loading their checkpoint
    assert sorted(set(ours) - set(theirs)) == []  # would be "unexpected keys"
    assert ours == theirs  # no shape mismatch


def test_student_config_expresses_layout_like_official():
    """layers_per_block 1, mid_block_type null, 3 stages for tiny: as the official configs say it."""
    teacher_config = load_preset("sd-v1")["unet"]
    for arch, official in (
        ("bk-base", "v1_bk_base.json"),
        ("bk-small", "v1_bk_small.json"),
        ("bk-tiny", "v1_bk_tiny.json"),
    ):
        ours = student_config(teacher_config, get_layout(arch, teacher_config))
        theirs = json.loads((DATA / official).read_text())
        for key in (
            "layers_per_block",
            "block_out_channels",
            "down_block_types",
            "up_block_types",
            "cross_attention_dim",
        ):
            assert ours[key] == theirs[key], key
        assert ours.get("mid_block_type", "UNetMidBlock2DCrossAttn") == theirs["mid_block_type"]
