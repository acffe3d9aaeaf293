"""Numbers every command takes are checked before anything loads: no nan/inf, ranges named by flag."""

from __future__ import annotations

import pytest

from distilsd.errors import InputError


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["generate", "a cat", "--guidance", "nan"], "'--guidance': 'nan' is not a finite number"),
        (["generate", "a cat", "-g", "inf"], "'--guidance': 'inf' is not a finite number"),
        (["generate", "a cat", "--strength", "nan"], "'--strength': 'nan' is not a finite number"),
        (
            ["generate", "a cat", "--seed", "99999999999999999999"],
            "'--seed': 99999999999999999999 is not a seed",
        ),
        (
            ["generate", "a cat", "--seed", "-1"],
            "'--seed': -1 is not a seed between 0 and 9223372036854775807",
        ),
        (["eval", "generate", "-m", "x", "-p", "p.csv", "--seed", "-5"], "'--seed': -5 is not a seed"),
        (
            ["distill", "--teacher", "x", "--lr", "nan"],
            "'--learning-rate' / '--lr': 'nan' is not a finite number",
        ),
        (["bench-train", "--steps", "-1"], "'--steps': -1 is not in the range x>=1"),
        (["shapes", "eval-hexagon", "-o", "x", "--prompts", "0"], "'--prompts': 0 is not in the range x>=1"),
        (["serve-loadtest", "--time-limit", "nan"], "'--time-limit': 'nan' is not a finite number"),
    ],
)
def test_flags_refuse_non_finite_and_out_of_range_numbers(run_cli, args, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli([*args, "-o", "out"] if args[0] == "generate" else args)
    assert code == 2, (out, err)
    assert "Traceback" not in err and fragment in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--port", "-1"], "error: --port -1 must be between 0 and 65535"),
        (["serve", "--port", "70000"], "error: --port 70000 must be between 0 and 65535"),
        (["serve-loadtest", "--size", "99999"], "error: --size 99999 must be a multiple of 8 between 64 and 1024"),
        (["generate", "a cat", "--seed", str(2**63 - 1), "--num-images", "2"], "error: --seed 9223372036854775807 must be between 0 and"),
        (
            ["distill", "--teacher", "x", "--data", "d", "-o", "run", "--lr", "-1"],
            "error: invalid training config: optim.learning_rate (--learning-rate/--lr) must be in (0.0, inf) (got -1.0)",
        ),
    ],
)  # fmt: skip
def test_values_are_checked_before_a_model_loads(run_cli, args, message, tmp_path, monkeypatch):
    # The model names do not exist: an answer about them would mean the check came too late.
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli([*args, "-m", "/nonexistent"] if args[0].startswith("serve") else args)
    assert code == 2, (out, err)
    assert "Traceback" not in err and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_python_api_and_config_refuse_non_finite_numbers(tmp_path):
    from distilsd.distill import load_config
    from distilsd.generate import generate

    for value in (float("nan"), float("inf")):
        with pytest.raises(InputError, match="--guidance .* must be a finite number >= 0"):
            generate(["a cat"], model="/nonexistent", output_dir=tmp_path / "out", guidance_scale=value)
    with pytest.raises(InputError, match="--seed .* must be between 0 and 9223372036854775807"):
        generate(["a cat"], model="/nonexistent", output_dir=tmp_path / "out", seed=2**64)
    assert not (tmp_path / "out").exists()

    recipe = tmp_path / "run.yaml"
    recipe.write_text("optim:\n  learning_rate: .nan\nloss:\n  l_out: .inf\nmax_steps: .inf\n")
    with pytest.raises(InputError) as info:
        load_config(recipe)
    assert "optim.learning_rate: expected a finite number, got nan" in info.value.message
    assert "loss.l_out: expected a finite number, got inf" in info.value.message
    assert "max_steps: expected a number, got inf" in info.value.message
    with pytest.raises(InputError, match=r"seed must be in \[0, 4294967295\]"):
        load_config(overrides={"seed": 2**40})
    with pytest.raises(InputError, match=r"optim.learning_rate must be in \(0.0, inf\) \(got -1.0\)"):
        load_config(overrides={"optim.learning_rate": -1})
