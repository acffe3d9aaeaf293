import pytest

from distilsd.distill.config import (
    TrainConfig,
    config_differences,
    load_config,
    parse_overrides,
    stage_configs,
    trajectory_fields,
)
from distilsd.errors import InputError


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "teacher: /models/sd\nmax_steps: 100\ndata:\n  resolution: 256\n  crop: random\nloss:\n  l_out: 0.5\n"
    )
    config = load_config(
        path, parse_overrides(["max_steps=7", "optim.learning_rate=1e-4", "loss.feature_pairs=[[a, b]]"])
    )
    assert config.teacher == "/models/sd"
    assert config.max_steps == 7  # the override wins over the file
    assert config.data.resolution == 256 and config.data.crop == "random"
    assert config.loss.l_out == 0.5 and config.loss.l_task == 1.0
    assert config.optim.learning_rate == pytest.approx(1e-4)
    assert config.loss.feature_pairs == [["a", "b"]]


def test_unknown_keys_and_bad_values_are_all_reported(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("max_step: 3\ndata:\n  resolutoin: 64\nmixed_precision: fp8\n")
    with pytest.raises(InputError) as info:
        load_config(path, {"optim.learning_rate": "fast"})
    message = str(info.value)
    for part in (
        "unknown key 'max_step'",
        "unknown key 'data.resolutoin'",
        "mixed_precision: 'fp8'",
        "optim.learning_rate",
    ):
        assert part in message


def test_resolution_must_be_multiple_of_8():
    with pytest.raises(InputError, match="multiple of 8"):
        load_config(overrides={"data.resolution": 60})


def test_timestep_sampling_choices_and_spread_are_checked():
    with pytest.raises(InputError) as info:
        load_config(overrides={"loss.timestep_sampling": "cosine", "loss.logit_std": 0})
    assert "loss.timestep_sampling: 'cosine' is not one of uniform, logit_normal" in str(info.value)
    assert "loss.logit_std must be more than 0" in str(info.value)


def test_trajectory_differences_name_the_field():
    saved = trajectory_fields(load_config(overrides={"optim.learning_rate": 1e-4, "max_steps": 10}))
    now = load_config(overrides={"optim.learning_rate": 2e-4, "max_steps": 99, "checkpoint_every": 3})
    diffs = config_differences(saved, now)
    assert len(diffs) == 1 and diffs[0].startswith("optim.learning_rate")


def test_turning_the_latent_cache_on_is_allowed_on_resume():
    saved = trajectory_fields(load_config(overrides={"data.cache_latents": False}))
    now = load_config(overrides={"data.cache_latents": True, "data.cache_dtype": "float16"})
    assert config_differences(saved, now) == []
    # A checkpoint written before data.cache_dtype became free to change still resumes.
    assert config_differences({**saved, "data.cache_dtype": "float32"}, now) == []


def test_fields_added_since_a_checkpoint_resume_at_their_defaults():
    """A checkpoint written before loss.timestep_sampling existed resumes with the default, not another."""
    saved = trajectory_fields(load_config())
    old = {k: v for k, v in saved.items() if not k.startswith("loss.") or k in ("loss.l_task", "loss.l_out")}
    assert config_differences(old, load_config()) == []
    diffs = config_differences(old, load_config(overrides={"loss.timestep_sampling": "logit_normal"}))
    assert diffs == ["loss.timestep_sampling: checkpoint has 'uniform', now 'logit_normal'"]


def test_stages_inherit_and_override():
    config = load_config(
        overrides={
            "max_steps": 5,
            "teacher": "A",
            "stages": [
                {"name": "plain", "teacher": None, "loss": {"l_out": 0, "l_feat": 0}},
                {"name": "kd-b", "teacher": "B", "max_steps": 9},
            ],
        }
    )
    first, second = stage_configs(config)
    assert (first.name, first.teacher, first.max_steps, first.loss.l_out) == ("plain", None, 5, 0.0)
    assert (second.name, second.teacher, second.max_steps, second.loss.l_out) == ("kd-b", "B", 9, 1.0)
    with pytest.raises(InputError, match=r"stages\[0\].bogus"):
        load_config(overrides={"stages": [{"bogus": 1}]})


def test_a_compile_backend_torch_does_not_know_is_refused_naming_the_known_ones():
    assert load_config(overrides={"compile": True, "compile_backend": "aot_eager"}).compile_backend == "aot_eager"
    with pytest.raises(InputError, match=r"unknown torch.compile backend 'nope' \(known: .*inductor"):
        load_config(overrides={"compile": True, "compile_backend": "nope"})


def test_default_config_is_valid():
    assert isinstance(load_config(), TrainConfig)


@pytest.mark.parametrize("name", ["bk-sdm-tiny", "segmind-small", "ofa-three-stage"])
def test_every_shipped_recipe_is_valid(name):
    from distilsd.distill.config import recipe_names

    assert name in recipe_names()
    config = load_config(name, {"teacher": "/models/sd", "data.source": "/data", "output_dir": "/runs/x"})
    assert config.teacher == "/models/sd"
    for stage in stage_configs(config):
        assert stage.max_steps > 0


def test_all_recipes_are_tested():
    from distilsd.distill.config import recipe_names

    # The shapes-* recipes run end to end (at reduced size) in tests/shapes/test_model.py;
    # shapes-tiny-vae in tests/test_tiny_vae.py; shapes-tiny-lcm in tests/distill/test_lcm_trainer.py.
    assert recipe_names() == [
        "bk-sdm-tiny",
        "ofa-three-stage",
        "segmind-small",
        "shapes-teacher",
        "shapes-teacher-ln",
        "shapes-tiny-kd",
        "shapes-tiny-lcm",
        "shapes-tiny-task",
        "shapes-tiny-vae",
        "shapes-vae",
        "shapes-vae-decoder",
    ]


def test_missing_config_file_names_the_recipes():
    with pytest.raises(InputError, match="config file not found") as info:
        load_config("no-such-recipe")
    assert "bk-sdm-tiny" in info.value.hint


def test_the_resolution_defaults_to_the_models_own(tiny_pipeline_dir, tmp_path):
    """`train --model shapes-tiny` without --resolution trains at 64 px, not SD 1.x's 512."""
    import json

    unet = json.loads((tiny_pipeline_dir / "unet" / "config.json").read_text())
    vae = json.loads((tiny_pipeline_dir / "vae" / "config.json").read_text())
    own = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    assert own != 512
    assert load_config(overrides={"model": str(tiny_pipeline_dir)}).data.resolution == own
    assert load_config(overrides={"teacher": str(tiny_pipeline_dir)}).data.resolution == own
    given = load_config(overrides={"model": str(tiny_pipeline_dir), "data.resolution": 128})
    assert given.data.resolution == 128
    (tmp_path / "c.yaml").write_text(f"model: {tiny_pipeline_dir}\ndata:\n  resolution: 256\n")
    assert load_config(tmp_path / "c.yaml").data.resolution == 256  # a file's value is kept
    assert load_config(overrides={"model": "some-org/some-hub-model"}).data.resolution == 512
    assert load_config(overrides={"model": "shapes-tiny"}).data.resolution == 64
