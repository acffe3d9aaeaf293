"""Students built from tiny SD-topology teachers: mapping, forward, save/reload, layouts."""

from __future__ import annotations

import pytest
import torch

from distilsd.compress import build_student, get_layout, student_config, tensor_mapping
from distilsd.compress.teacher import load_preset
from distilsd.errors import InputError
from distilsd.testing import tiny_unet

PRESETS = ("bk-base", "bk-small", "bk-tiny")


@pytest.fixture(scope="module")
def teacher_v1():
    return tiny_unet(seed=0).eval()


@pytest.fixture(scope="module")
def teacher_v2():
    return tiny_unet(seed=1, sd_version=2, cross_attention_dim=48).eval()


def unet_inputs(unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    sample = torch.randn(2, unet.config.in_channels, size, size, generator=generator)
    text = torch.randn(2, 5, unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor([10, 500]), text


@pytest.mark.parametrize("arch", PRESETS)
@pytest.mark.parametrize("version", [1, 2])
def test_mapped_tensors_equal_teacher_and_forward_runs(arch, version, teacher_v1, teacher_v2):
    teacher = teacher_v1 if version == 1 else teacher_v2
    student, mapping = build_student(teacher, get_layout(arch, teacher.config), init="teacher")
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    assert set(mapping) == set(student_state)  # every student tensor comes from the teacher
    for student_name, teacher_name in mapping.items():
        assert torch.equal(student_state[student_name], teacher_state[teacher_name]), student_name
        # own storage: training the student must not write into the teacher
        assert student_state[student_name].data_ptr() != teacher_state[teacher_name].data_ptr()
    with torch.no_grad():
        out = student(*unet_inputs(teacher)).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_bk_sdm_init_rules(teacher_v1):
    _, base = build_student(teacher_v1, get_layout("bk-base", teacher_v1.config))
    assert base["down_blocks.1.resnets.0.conv1.weight"] == "down_blocks.1.resnets.0.conv1.weight"
    # up blocks: first and last teacher layer
    assert base["up_blocks.2.resnets.1.conv1.weight"] == "up_blocks.2.resnets.2.conv1.weight"
    assert base["up_blocks.2.attentions.1.proj_in.weight"] == "up_blocks.2.attentions.2.proj_in.weight"
    assert base["mid_block.resnets.0.conv1.weight"] == "mid_block.resnets.0.conv1.weight"
    _, tiny = build_student(teacher_v1, get_layout("bk-tiny", teacher_v1.config))
    # tiny: student up_blocks[i] <- teacher up_blocks[i + 1], upsamplers included
    assert tiny["up_blocks.0.resnets.1.conv1.weight"] == "up_blocks.1.resnets.2.conv1.weight"
    assert tiny["up_blocks.1.upsamplers.0.conv.weight"] == "up_blocks.2.upsamplers.0.conv.weight"
    assert not any(
        name.startswith(("mid_block", "down_blocks.3", "down_blocks.2.downsamplers")) for name in tiny
    )
    assert not any(t.startswith(("up_blocks.0.", "down_blocks.3")) for t in tiny.values())


def test_random_init(teacher_v1):
    student, mapping = build_student(teacher_v1, get_layout("bk-small", teacher_v1.config), init="random")
    assert mapping == {}
    assert not torch.equal(student.conv_in.weight, teacher_v1.conv_in.weight)


def test_scaled_down_teacher_gets_the_sd_removal_pattern(teacher_v1, teacher_v2):
    for version, teacher in ((1, teacher_v1), (2, teacher_v2)):
        sd_config = load_preset(f"sd-v{version}")["unet"]
        for arch in PRESETS:
            sd_layout = get_layout(arch, sd_config)
            tiny_layout = get_layout(arch, teacher.config)
            assert tiny_layout.removed_modules == sd_layout.removed_modules
            assert tiny_layout.feature_pairs == sd_layout.feature_pairs
            # the same mapping as for full-size SD (computed on meta), layer by layer; the tiny
            # teacher has a few tensors less (no conv_shortcut where its widths stay equal)
            _, mapping = build_student(teacher, tiny_layout)
            sd_mapping = tensor_mapping(sd_config, sd_layout)
            assert mapping.items() <= sd_mapping.items()
            assert {layer(s): layer(t) for s, t in mapping.items()} == {
                layer(s): layer(t) for s, t in sd_mapping.items()
            }


def layer(name: str) -> str:
    """'up_blocks.1.resnets.2.conv1.weight' -> 'up_blocks.1.resnets.2'; 'conv_in.weight' -> 'conv_in'."""
    parts = name.split(".")
    return ".".join(parts[:4] if parts[0] in ("down_blocks", "up_blocks") else parts[:1])


def test_feature_pairs():
    config = load_preset("sd-v1")["unet"]
    blocks = [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(4)] + [
        (f"up_blocks.{i}", f"up_blocks.{i}") for i in range(4)
    ]
    assert get_layout("bk-base", config).feature_pairs == blocks
    assert get_layout("bk-small", config).feature_pairs == blocks
    assert get_layout("bk-tiny", config).feature_pairs == [
        ("down_blocks.0", "down_blocks.0"),
        ("down_blocks.1", "down_blocks.1"),
        ("down_blocks.2.attentions.1.proj_out", "down_blocks.2.attentions.0.proj_out"),
        ("up_blocks.1", "up_blocks.0"),
        ("up_blocks.2", "up_blocks.1"),
        ("up_blocks.3", "up_blocks.2"),
    ]


@pytest.mark.parametrize(
    "arch", ["bk-base", "bk-tiny", {"name": "deep", "down_layers": [[0, 1], [0], [0, 1], [1]]}]
)
def test_feature_pair_outputs_have_matching_shapes(arch, teacher_v1):
    """Hooked teacher and student modules (first tuple element) give same-shape features."""
    layout = get_layout(arch, teacher_v1.config)
    student, _ = build_student(teacher_v1, layout)
    features = {}

    def hook(key):
        def record(module, args, output):
            features[key] = (output[0] if isinstance(output, tuple) else output).shape

        return record

    handles = []
    for teacher_name, student_name in layout.feature_pairs:
        handles.append(
            teacher_v1.get_submodule(teacher_name).register_forward_hook(hook(("t", teacher_name)))
        )
        handles.append(student.get_submodule(student_name).register_forward_hook(hook(("s", student_name))))
    inputs = unet_inputs(teacher_v1)
    with torch.no_grad():
        teacher_v1(*inputs)
        student(*inputs)
    for handle in handles:
        handle.remove()
    for teacher_name, student_name in layout.feature_pairs:
        assert features[("t", teacher_name)] == features[("s", student_name)], (teacher_name, student_name)


def test_save_and_reload_gives_identical_outputs(tmp_path, teacher_v2):
    from diffusers import UNet2DConditionModel

    student, _ = build_student(teacher_v2, get_layout("bk-tiny", teacher_v2.config))
    student.eval().save_pretrained(tmp_path / "student")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "student").eval()
    inputs = unet_inputs(teacher_v2, seed=3)
    with torch.no_grad():
        assert torch.equal(student(*inputs).sample, reloaded(*inputs).sample)
    assert reloaded.config.layers_per_block == 1 and reloaded.config.mid_block_type is None
    assert list(reloaded.config.attention_head_dim) == [1, 2, 4]


# -- custom layouts ---------------------------------------------------------------------------


def test_custom_spec_from_yaml_file(tmp_path, teacher_v1):
    spec = tmp_path / "mid-less.yaml"
    spec.write_text(
        "name: my-student\nbase: bk-base\nmid_block: false\ndown_layers: [[0, 1], [0], [0], [0]]\n"
    )
    layout = get_layout(spec, teacher_v1.config)
    assert layout.name == "my-student"
    assert layout.up_layers[-1] == (0, 1, 2)  # mirror of a 2-layer down block: first two + last
    assert layout.up_layers[0] == (0, 2)
    config = student_config(teacher_v1.config, layout)
    assert config["layers_per_block"] == [2, 1, 1, 1] and config["mid_block_type"] is None
    student, mapping = build_student(teacher_v1, layout)
    assert mapping["down_blocks.0.resnets.1.conv1.weight"] == "down_blocks.0.resnets.1.conv1.weight"
    with torch.no_grad():
        assert student(*unet_inputs(teacher_v1)).sample.shape == (2, 4, 8, 8)


def test_custom_spec_json_and_mapping(tmp_path, teacher_v1):
    spec = tmp_path / "spec.json"
    spec.write_text('{"down_layers": [[1], [0], [0], [0]], "up_layers": [[1, 2], [0, 2], [0, 2], [0, 2]]}')
    layout = get_layout(str(spec), teacher_v1.config)
    assert layout.name == "spec" and layout.mid_block
    _, mapping = build_student(teacher_v1, layout)
    assert mapping["down_blocks.0.resnets.0.conv1.weight"] == "down_blocks.0.resnets.1.conv1.weight"
    assert mapping["up_blocks.0.resnets.0.conv1.weight"] == "up_blocks.0.resnets.1.conv1.weight"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"down_layers": [[0], [0], [0], [0]], "up_layers": [[0, 1, 2], [0, 2], [0, 2], [0, 2]]},
            "up_blocks.0 keeps 3 layers",
        ),
        ({"down_layers": [[0], [1], [0], [0]]}, "down_blocks.1: student layer 0 would be teacher resnets.1"),
        (
            {"down_layers": [[0], [0], [0], [0]], "up_layers": [[0, 2], [0, 2], [0, 1], [0, 2]]},
            "up_blocks.2: student layer 1",
        ),
        ({"down_layers": [[0], [0], [5], [0]]}, "down_blocks.2 keeps teacher layer 5"),
        ({"down_layers": [[0], [], [0], [0]]}, "down_blocks.1 keeps no layer"),
        ({"down_layers": [[1, 0], [0], [0], [0]]}, "down_blocks.0 keeps layers [1, 0]"),
        ({"down_layers": [[0], [0], [0]]}, "'down_layers' lists 3 blocks"),
        ({"base": "bk-small", "drop_stages": 2, "mid_block": True}, "mid_block"),
        ({"drop_stages": 2, "mid_block": False}, "up_blocks.0: student layer 0"),
        ({"base": "bk-huge"}, "unknown base preset 'bk-huge'"),
        ({"layers": 1}, "unknown key(s) layers"),
        ({"mid_block": "yes"}, "'mid_block' must be true or false"),
    ],
)
def test_bad_specs_are_refused_naming_the_block(spec, message):
    config = load_preset("sd-v1")["unet"]
    with pytest.raises(InputError) as excinfo:
        get_layout(spec, config)
    assert message in str(excinfo.value)


def test_unknown_and_unconfirmed_presets():
    config = load_preset("sd-v1")["unet"]
    with pytest.raises(InputError, match="unknown student architecture 'bk-huge'"):
        get_layout("bk-huge", config)
    with pytest.raises(InputError, match="not a preset"):
        get_layout("ofa-small", config)
    assert get_layout("sd_small", config).name == "bk-base"  # segmind's sd_small keeps the mid block
    assert get_layout("SD_TINY", config).name == "bk-tiny"


def test_teacher_must_be_a_unet2dconditionmodel():
    from distilsd.testing import tiny_vae

    with pytest.raises(InputError, match="not a diffusers UNet2DConditionModel"):
        build_student(tiny_vae(), "bk-base")
    with pytest.raises(InputError, match="not a UNet2DConditionModel"):
        get_layout("bk-base", {"_class_name": "UNet2DModel", "down_block_types": []})
