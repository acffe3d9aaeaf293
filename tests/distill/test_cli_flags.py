"""The flags of `distill` / `train` follow the TrainConfig dataclasses: every field has a flag
or a stated reason not to, choices and shown defaults are the config's, and each flag sets its
field."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from distilsd.cli import distill as distill_cli
from distilsd.distill.config import CHOICES, OLD_PRECISION_CHOICES, TrainConfig, load_config, to_flat_dict
from distilsd.errors import InputError

COMMANDS = {"distill": distill_cli.distill_command, "train": distill_cli.train_command}
NOT_FIELDS = {"config_file", "overrides", "help"}


def _flag_keys(command: click.Command) -> dict[str, click.Parameter]:
    return {
        distill_cli.config_key(param.name): param for param in command.params if param.name not in NOT_FIELDS
    }


@pytest.mark.parametrize("name", COMMANDS)
def test_every_config_field_has_a_flag_or_a_reason(name):
    fields = set(to_flat_dict(TrainConfig()))
    flagged = set(_flag_keys(COMMANDS[name]))
    excluded = set(distill_cli.NO_FLAG) | set(distill_cli.NO_FLAG_IN[name])
    assert flagged - fields == set(), "flags that set no config field"
    assert excluded - fields == set(), "exclusions that name no config field"
    assert flagged & excluded == set(), "fields both flagged and excluded"
    assert fields - flagged - excluded == set(), "config fields with no flag: add one or say why not"


@pytest.mark.parametrize("name", COMMANDS)
def test_choices_and_shown_defaults_come_from_the_config(name):
    defaults = to_flat_dict(TrainConfig())
    for key, param in _flag_keys(COMMANDS[name]).items():
        if key in CHOICES:
            # Old precision spellings (mixed precision "no") are still taken, after the config's own.
            assert tuple(param.type.choices) == CHOICES[key] + OLD_PRECISION_CHOICES.get(key, ()), key
        else:
            assert not isinstance(param.type, click.Choice), f"{key}: choices outside config.CHOICES"
        shown = distill_cli.format_default(defaults[key])
        if shown and (param.secondary_opts or not param.is_flag):  # a plain on-flag shows no default
            assert f"[default: {shown}]" in param.help, key
    help_text = CliRunner().invoke(COMMANDS[name], ["--help"], terminal_width=200).output
    assert "--learning-rate, --lr FLOAT" in help_text and "[default: 5e-5]" in help_text
    assert "[csv|tensorboard|wandb]" in help_text and "[default: csv, tensorboard]" in help_text


def test_flags_set_their_fields_over_the_file_and_key_values(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(distill_cli, "_run", ran.append)
    config_file = tmp_path / "run.yaml"
    config_file.write_text("teacher: teacher-dir\nmax_steps: 7\ndata:\n  resolution: 64\n")
    args = ["-c", str(config_file), "-o", "out", "--data", "images", "--data-format", "hf", "--lr", "1e-4",
            "--grad-accum", "3", "--batch-size", "2", "--no-ema", "--no-progress", "--overwrite",
            "--validation-prompt", "a", "--validation-prompt", "b", "--log-with", "csv", "--log-with", "wandb",
            "--snr-gamma", "5", "--l-feat", "0.5", "--seed", "9", "--checkpoint-every", "0",
            "optim.learning_rate=1", "vae.kl_weight=0.5"]  # fmt: skip
    result = CliRunner().invoke(distill_cli.distill_command, args)
    assert result.exit_code == 0, result.output
    (config,) = ran
    assert config.teacher == "teacher-dir" and config.max_steps == 7  # from the file
    assert config.data.resolution == 64  # not given as a flag: the file's value stays
    assert config.optim.learning_rate == pytest.approx(1e-4)  # the flag beats key=value
    assert config.vae.kl_weight == 0.5  # a field without a flag, set as key=value
    assert (config.output_dir, config.data.source, config.data.format) == ("out", "images", "hf")
    assert (config.gradient_accumulation_steps, config.train_batch_size, config.seed) == (3, 2, 9)
    assert config.optim.ema is False and config.progress_bar is False and config.overwrite is True
    assert config.validation.prompts == ["a", "b"] and config.log_with == ["csv", "wandb"]
    assert config.loss.snr_gamma == 5.0 and config.loss.l_feat == 0.5 and config.checkpoint_every == 0


def test_log_with_entries_are_checked():
    with pytest.raises(InputError, match="log_with: 'tensorbaord' is not one of csv, tensorboard, wandb"):
        load_config(overrides={"log_with": ["csv", "tensorbaord"]})


def test_switches_not_given_leave_the_file_alone(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(distill_cli, "_run", ran.append)
    config_file = tmp_path / "run.yaml"
    config_file.write_text("model: m\noverwrite: true\nprogress_bar: false\noptim:\n  ema: false\n")
    result = CliRunner().invoke(distill_cli.train_command, ["-c", str(config_file)])
    assert result.exit_code == 0, result.output
    (config,) = ran
    assert config.overwrite is True and config.progress_bar is False and config.optim.ema is False
    assert config.loss.l_out == 0.0 and config.log_with == ["csv", "tensorboard"]  # train's base, defaults
