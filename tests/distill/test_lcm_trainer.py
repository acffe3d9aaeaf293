"""LCM distillation end to end on tiny models: the consistency loss falls, resume is exact, the
result samples in plain diffusers and in `distilsd generate`, LCM-LoRA, and refusals."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from distilsd.distill import load_config, run_training
from distilsd.errors import InputError

from .conftest import read_csv, tiny_run_overrides


def _lcm_overrides(teacher, data, output, **overrides):
    values = tiny_run_overrides(teacher, data, output, **overrides)
    values.pop("arch", None)  # the teacher's own architecture unless a test asks for another
    values.update(
        method="lcm", **{"lcm.num_ddim_timesteps": 10, "lcm.guidance_min": 2.0, "lcm.guidance_max": 6.0}
    )
    values.update({k: v for k, v in overrides.items() if not isinstance(v, dict)})
    return values


def _trainer(overrides):
    from distilsd.distill.trainer import Trainer

    trainer = Trainer(load_config(overrides=overrides))
    trainer.setup()
    return trainer


@torch.no_grad()
def _heldout_consistency_loss(trainer, batch) -> float:
    """The student's self-consistency on fixed draws (steps 10_000.. of the step generator: same
    noise, solver steps and guidance): the LCD loss with the student itself as the target, so
    that before and after are measured against the same function of the student."""
    target, trainer.lcm_target = trainer.lcm_target, None
    try:
        return sum(float(trainer.compute_loss(batch, 10_000 + i, 0)["loss"]) for i in range(8)) / 8
    finally:
        trainer.lcm_target = target


@pytest.mark.slow
def test_lcm_steps_lower_the_consistency_loss_and_start_as_the_teacher(
    tiny_pipeline_dir, shapes_dir, tmp_path
):
    from distilsd.distill.lcm import guidance_scale_embedding
    from distilsd.distill.losses import unwrap

    overrides = _lcm_overrides(
        tiny_pipeline_dir,
        shapes_dir,
        tmp_path / "run",
        max_steps=40,
        **{"data.max_samples": 4, "optim.learning_rate": 3e-4},
    )
    trainer = _trainer(overrides)
    try:
        student = unwrap(trainer.model)
        assert student.config.time_cond_proj_dim == 256
        # The guidance embedding's projection starts at zero: at step 0 the student is the teacher.
        sample, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 19])
        text = torch.randn(2, 77, student.config.cross_attention_dim)
        w = guidance_scale_embedding(torch.tensor([1.0, 5.0]), 256)
        torch.testing.assert_close(
            student(sample, t, text, timestep_cond=w).sample, trainer.teacher(sample, t, text).sample
        )
        batch = next(iter(trainer._make_loader(0)))
        before = _heldout_consistency_loss(trainer, batch)
        summary = trainer.train()
        after = _heldout_consistency_loss(trainer, batch)
    finally:
        trainer.cleanup()
    assert after < 0.9 * before, (before, after)  # 0.215 -> 0.175 when written
    assert summary.steps == 40
    run = tmp_path / "run"
    info = json.loads((run / "distill_info.json").read_text())
    assert (info["method"], info["scheduler"], info["num_inference_steps"]) == ("lcm", "lcm", 4)
    assert json.loads((run / "model_index.json").read_text())["scheduler"] == ["diffusers", "LCMScheduler"]


def test_lcm_result_samples_in_plain_diffusers_and_distilsd_generate(
    tiny_pipeline_dir, shapes_dir, tmp_path, caplog
):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from distilsd.generate import generate

    run = tmp_path / "run"
    overrides = _lcm_overrides(tiny_pipeline_dir, shapes_dir, run, max_steps=2)
    overrides.update({"validation.prompts": ["a red circle"], "validation.num_inference_steps": 2})
    run_training(load_config(overrides=overrides))
    assert (run / "validation" / "step-000002.png").is_file()  # teacher beside the 4-step LCM student
    pipe = StableDiffusionPipeline.from_pretrained(run, safety_checker=None)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.original_inference_steps == 10
    pipe.scheduler.set_timesteps(4)
    # Four of the ten solver timesteps the student was trained on (k = 100), from the zero-SNR end.
    assert pipe.scheduler.timesteps.tolist() == [999, 799, 499, 299]
    image = pipe(
        "a red circle", num_inference_steps=4, guidance_scale=4.5, output_type="np", height=64, width=64
    ).images
    assert image.shape == (1, 64, 64, 3) and bool((image >= 0).all())

    (record,) = generate(["a red circle"], model=str(run), output_dir=tmp_path / "out", progress=False)
    assert (record.steps, record.scheduler) == (4, "lcm")
    with caplog.at_level("WARNING"):
        (record,) = generate(
            ["a red circle"], model=str(run), output_dir=tmp_path / "out2", scheduler="euler", progress=False
        )
    assert "--scheduler euler integrates it as an ordinary diffusion model" in caplog.text
    assert record.steps == 4


@pytest.mark.slow
def test_lcm_resume_is_exact_with_the_target_network_in_the_checkpoint(
    tiny_pipeline_dir, shapes_dir, tmp_path
):
    from safetensors.torch import load_file

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_training(load_config(overrides=_lcm_overrides(tiny_pipeline_dir, shapes_dir, reference, max_steps=4)))
    run_training(load_config(overrides=_lcm_overrides(tiny_pipeline_dir, shapes_dir, resumed, max_steps=2)))
    assert (resumed / "checkpoints" / "checkpoint-2" / "unet_target").is_dir()
    run_training(
        load_config(
            overrides=_lcm_overrides(tiny_pipeline_dir, shapes_dir, resumed, max_steps=4, resume="latest")
        )
    )
    expected, got = read_csv(reference / "logs" / "train.csv"), read_csv(resumed / "logs" / "train.csv")
    assert [row["step"] for row in got] == [1, 2, 3, 4]
    for want, row in zip(expected, got, strict=True):
        assert row["loss"] == want["loss"], row["step"]
    for folder in ("unet", "unet_target"):
        want = load_file(
            reference / "checkpoints" / "checkpoint-4" / folder / "diffusion_pytorch_model.safetensors"
        )
        have = load_file(
            resumed / "checkpoints" / "checkpoint-4" / folder / "diffusion_pytorch_model.safetensors"
        )
        assert want.keys() == have.keys()
        assert all(torch.equal(want[k], have[k]) for k in want), folder
    # The target network trails the student (EMA 0.95), it is not a copy of it.
    student = load_file(
        reference / "checkpoints" / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors"
    )
    target = load_file(
        reference / "checkpoints" / "checkpoint-4" / "unet_target" / "diffusion_pytorch_model.safetensors"
    )
    assert any(not torch.equal(student[k], target[k]) for k in student)


def test_lcm_lora_trains_adapters_that_generate_loads(tiny_pipeline_dir, shapes_dir, tmp_path):
    from distilsd.generate import generate
    from distilsd.lora.names import LORA_INFO, LORA_WEIGHTS

    run = tmp_path / "lora"
    overrides = _lcm_overrides(tiny_pipeline_dir, shapes_dir, run, max_steps=3, **{"lora.rank": 4})
    overrides.update({"validation.prompts": ["a red circle"], "validation.num_inference_steps": 2})
    trainer = _trainer(overrides)
    try:
        assert trainer.lcm_target is None  # LCM-LoRA: the adapted U-Net is its own target
        assert trainer.guidance_embedding_dim is None
        trainer.train()
    finally:
        trainer.cleanup()
    assert (run / LORA_WEIGHTS).is_file() and (run / "validation" / "step-000003.png").is_file()
    info = json.loads((run / LORA_INFO).read_text())
    assert (info["method"], info["guidance_scale"], info["num_inference_steps"]) == ("lcm", 1.0, 4)
    # The base model's own scheduler is replaced by LCM, 4 steps, guidance 1 (no CFG batch).
    (record,) = generate(
        ["a red circle"],
        model=str(tiny_pipeline_dir),
        loras=[str(run)],
        output_dir=tmp_path / "out",
        progress=False,
    )
    assert (record.scheduler, record.steps, record.guidance_scale) == ("lcm", 4, 1.0)


def test_lcm_refuses_teachers_and_settings_it_cannot_handle(tiny_pipeline_dir, shapes_dir, tmp_path):
    from distilsd.distill.trainer import Trainer

    # An epsilon teacher on a zero-terminal-SNR schedule: x0 would divide by alpha = 0.
    teacher = tmp_path / "eps-ztsnr"
    shutil.copytree(tiny_pipeline_dir, teacher)
    config_file = teacher / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(config_file.read_text())
    scheduler.update(prediction_type="epsilon", rescale_betas_zero_snr=True)
    config_file.write_text(json.dumps(scheduler))
    trainer = Trainer(load_config(overrides=_lcm_overrides(teacher, shapes_dir, tmp_path / "run")))
    with pytest.raises(InputError, match="epsilon-prediction teacher with a zero-terminal-SNR schedule"):
        try:
            trainer.setup()
        finally:
            trainer.cleanup()

    base = _lcm_overrides(tiny_pipeline_dir, shapes_dir, tmp_path / "run2")
    # The target network is LCD's average: no EMA of the student unless asked for.
    assert load_config(overrides=base).optim.ema is False
    assert load_config(overrides={**base, "optim.ema": True}).optim.ema is True
    with pytest.raises(InputError, match=r"lcm.guidance_max \(1.5\) is below lcm.guidance_min \(2.0\)"):
        load_config(overrides={**base, "lcm.guidance_max": 1.5})
    with pytest.raises(InputError, match="method: lcm distills a teacher"):
        load_config(overrides={**base, "teacher": None})
    with pytest.raises(InputError, match="loss.noise_offset"):
        load_config(overrides={**base, "loss.noise_offset": 0.1})


@pytest.mark.slow
def test_shapes_lcm_recipe_runs_on_the_v_prediction_zero_snr_teacher(shapes_dir, tmp_path, run_cli):
    """The shipped recipe, shrunk: teacher shapes (v-prediction, zero terminal SNR), student shapes-tiny."""
    run = tmp_path / "tiny-lcm"
    args = [
        "distill", "-c", "shapes-tiny-lcm", "--data", str(shapes_dir), "-o", str(run), "--max-steps", "2",
        "--batch-size", "2", "--no-progress", "validation.prompts=[]", f"data.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    code, out, err = run_cli(args)
    assert code == 0, err
    assert "trained 2 steps" in out
    scheduler = json.loads((run / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["_class_name"], scheduler["prediction_type"], scheduler["timestep_spacing"]) == (
        "LCMScheduler",
        "v_prediction",
        "trailing",
    )
    assert scheduler["rescale_betas_zero_snr"] is True
    info = json.loads((run / "distill_info.json").read_text())
    assert info["guidance_scale"] == 4.5  # the Shapes models' default, inside the learned 2-8
    assert all(math.isfinite(row["loss"]) for row in read_csv(run / "logs" / "train.csv"))
