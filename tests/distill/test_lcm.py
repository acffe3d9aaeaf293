"""The LCD math against hand-computed values and against diffusers' own LCM code."""

from __future__ import annotations

import math

import pytest
import torch

from distilsd.distill import lcm
from distilsd.errors import InputError


def _schedule(*alphas_cumprod: float) -> torch.Tensor:
    return torch.tensor(alphas_cumprod, dtype=torch.float64)


def test_boundary_scalings_are_the_identity_at_zero_and_hand_computed_at_one():
    c_skip, c_out = lcm.boundary_scalings(torch.tensor([0, 1]), timestep_scaling=10.0)
    # t = 0: f(x, 0) = x. t = 1: scaled 10, c_skip = 0.25 / 100.25, c_out = 10 / sqrt(100.25).
    assert c_skip.tolist() == pytest.approx([1.0, 0.25 / 100.25])
    assert c_out.tolist() == pytest.approx([0.0, 10 / math.sqrt(100.25)])


def test_x0_and_noise_from_epsilon_and_v_predictions():
    alphas = _schedule(0.9, 0.64, 0.0)  # alpha = 0.8, sigma = 0.6 at t = 1; zero SNR at t = 2
    t = torch.tensor([1])
    x, out = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 0.5)
    x0, eps = lcm.predicted_x0_and_noise(out, t, x, "epsilon", alphas)
    assert (x0.item(), eps.item()) == (pytest.approx((1 - 0.6 * 0.5) / 0.8), pytest.approx(0.5))
    x0, eps = lcm.predicted_x0_and_noise(out, t, x, "v_prediction", alphas)
    assert (x0.item(), eps.item()) == (pytest.approx(0.8 - 0.6 * 0.5), pytest.approx(0.8 * 0.5 + 0.6))
    # Zero terminal SNR: x_T is pure noise, v = -x0, so x0 = -v and eps = x: finite for v.
    x0, eps = lcm.predicted_x0_and_noise(out, torch.tensor([2]), x, "v_prediction", alphas)
    assert (x0.item(), eps.item()) == (pytest.approx(-0.5), pytest.approx(1.0))
    with pytest.raises(InputError, match="'sample'"):
        lcm.predicted_x0_and_noise(out, t, x, "sample", alphas)


def test_ddim_solver_skips_k_timesteps_and_steps_to_the_previous_alpha():
    alphas = torch.linspace(0.99, 0.01, 10, dtype=torch.float64)
    solver = lcm.DDIMSolver(alphas, num_train_timesteps=10, num_solver_steps=5)
    alphas = alphas.tolist()
    assert solver.step_ratio == 2
    assert solver.timesteps.tolist() == [1, 3, 5, 7, 9]
    # Index 0 steps to alpha_cumprod[0]; index i to the solver timestep before it.
    assert solver.alphas_cumprod_prev.tolist() == pytest.approx(
        [alphas[0], alphas[1], alphas[3], alphas[5], alphas[7]]
    )
    x0, eps = torch.full((2, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1), -1.0)
    stepped = solver.step(x0, eps, torch.tensor([0, 2]))
    for value, alpha in zip(stepped.flatten().tolist(), (alphas[0], alphas[3]), strict=True):
        assert value == pytest.approx(2 * math.sqrt(alpha) - math.sqrt(1 - alpha))
    with pytest.raises(InputError, match="num_ddim_timesteps"):
        lcm.DDIMSolver(alphas, 10, 11)


def test_guidance_embedding_matches_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 1.5, 3.5])
    ours = lcm.guidance_scale_embedding(w, 256)
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    torch.testing.assert_close(ours, theirs)
    assert ours[0, :128].abs().max() == 0 and ours[0, 128:].tolist() == [1.0] * 128  # sin(0), cos(0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_consistency_output_is_what_lcm_scheduler_denoises_to(prediction_type):
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(prediction_type=prediction_type)
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[1]
    generator = torch.Generator().manual_seed(0)
    sample, output = (
        torch.randn(2, 4, 8, 8, generator=generator),
        torch.randn(2, 4, 8, 8, generator=generator),
    )
    scheduler._step_index = 1
    denoised = scheduler.step(output, t, sample, generator=generator).denoised
    timesteps = torch.full((2,), int(t))
    x0, _ = lcm.predicted_x0_and_noise(output, timesteps, sample, prediction_type, scheduler.alphas_cumprod)
    torch.testing.assert_close(lcm.consistency_output(sample, x0, timesteps, 10.0), denoised)


def test_pseudo_huber_loss_and_target_update():
    prediction, target = torch.tensor([0.0, 3.0]), torch.tensor([0.0, -1.0])
    c = 0.001
    # mean(sqrt(d^2 + c^2) - c) over d = 0, 4
    expected = (0.0 + math.sqrt(16 + c * c) - c) / 2
    assert lcm.consistency_loss(prediction, target, "huber", c).item() == pytest.approx(expected)
    assert lcm.consistency_loss(prediction, target, "l2", c).item() == pytest.approx(8.0)
    target_params, online_params = [torch.ones(3)], [torch.zeros(3)]
    lcm.update_target(target_params, online_params, 0.95)
    assert target_params[0].tolist() == pytest.approx([0.95] * 3)


def test_teacher_schedules_lcd_cannot_use_are_refused_by_name():
    alphas = torch.linspace(0.99, 0.0, 10, dtype=torch.float64)  # zero terminal SNR
    solver = lcm.DDIMSolver(alphas, 10, 5)
    lcm.check_teacher_schedule("v_prediction", alphas, solver)
    with pytest.raises(
        InputError, match="epsilon-prediction teacher with a zero-terminal-SNR schedule.*timestep 9"
    ):
        lcm.check_teacher_schedule("epsilon", alphas, solver)
    with pytest.raises(InputError, match="prediction type 'sample'"):
        lcm.check_teacher_schedule("sample", alphas, solver)
    lcm.check_teacher_schedule("epsilon", torch.linspace(0.99, 0.01, 10, dtype=torch.float64), solver)


def test_lcm_scheduler_follows_a_zero_snr_v_prediction_teacher():
    from diffusers import DDPMScheduler

    teacher = DDPMScheduler(
        beta_schedule="linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="leading",
    )
    scheduler = lcm.make_lcm_scheduler(dict(teacher.config), 50, 10.0, teacher.alphas_cumprod)
    assert type(scheduler).__name__ == "LCMScheduler"
    config = scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
        "v_prediction",
        True,
        "trailing",
    )
    assert config.original_inference_steps == 50
    scheduler.set_timesteps(4)
    assert scheduler.timesteps[0] == 999  # the zero-SNR step is sampled first
    with pytest.raises(InputError, match="alphas_cumprod differ"):
        lcm.make_lcm_scheduler(dict(teacher.config), 50, 10.0, teacher.alphas_cumprod * 0.5)
