"""Latent consistency distillation (LCD): the math, as small pure functions.

Latent Consistency Models (Luo et al. 2023) distill a diffusion teacher into a student that
maps any point of the teacher's probability-flow ODE straight to its end, so it samples in
1-8 steps with diffusers' ``LCMScheduler``. One training step (diffusers'
``examples/consistency_distillation/train_lcm_distill_sd_wds.py``):

1. pick a solver index n; the skipping-step DDIM schedule of N steps has timesteps
   ``t_i = (i + 1) * k - 1`` with ``k = T // N``; start at ``s = t_n``, end at ``e = s - k``
   (clamped at 0);
2. noise a clean latent to ``x_s`` and draw a guidance scale g ~ U[g_min, g_max];
3. the teacher's classifier-free guided x0 and eps at ``s`` (LCM's formulation
   ``cond + w * (cond - uncond)`` with ``w = g - 1``, which is diffusers' ``uncond + g * (cond -
   uncond)``), then one DDIM step to ``x_e``;
4. student at ``(x_s, s)`` and target network at ``(x_e, e)``, both given ``w`` as an
   embedding, each turned into a consistency output ``c_skip(t) x_t + c_out(t) x0(t)``;
5. loss = pseudo-Huber(student - target); the target network follows the student by an EMA.

The guidance embedding is of ``w = g - 1``: diffusers' ``StableDiffusionPipeline`` and
``LatentConsistencyModelPipeline`` embed ``guidance_scale - 1`` when the U-Net has
``time_cond_proj_dim``, so ``-g 4.5`` on the student asks for what ``-g 4.5`` gives on the
teacher.
"""

from __future__ import annotations

import math

import torch

from distilsd.errors import InputError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int = 512) -> torch.Tensor:
    """Sinusoidal embedding of the guidance weight ``w`` (shape ``(B,)`` -> ``(B, embedding_dim)``).

    Same as diffusers' ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``.
    """
    if w.ndim != 1:
        raise ValueError(f"w must be one-dimensional, got shape {tuple(w.shape)}")
    w = w.float() * 1000.0
    half_dim = embedding_dim // 2
    scale = math.log(10000.0) / (half_dim - 1)
    freqs = torch.exp(torch.arange(half_dim, dtype=torch.float32) * -scale).to(w.device)
    angles = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def boundary_scalings(
    timesteps: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` of the consistency parameterisation ``f(x, t) = c_skip x + c_out x0``.

    As ``LCMScheduler.get_scalings_for_boundary_condition_discrete``: c_skip(0) = 1 and
    c_out(0) = 0, so f is the identity at t = 0 (the boundary condition).
    """
    scaled = timestep_scaling * timesteps.float()
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    """``values[timesteps]`` shaped ``(B, 1, 1, 1)`` to broadcast over latents of ``ndim`` dims."""
    picked = values.to(timesteps.device)[timesteps]
    return picked.reshape(-1, *([1] * (ndim - 1)))


def predicted_x0_and_noise(
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    sample: torch.Tensor,
    prediction_type: str,
    alphas_cumprod: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latent and the noise a model output at ``(sample, timesteps)`` implies.

    epsilon: x0 = (x - sigma eps) / alpha; v: x0 = alpha x - sigma v, eps = alpha v + sigma x
    (finite at zero terminal SNR, alpha = 0, where x0 = -v and eps = x).
    """
    alpha_bar = _per_sample(alphas_cumprod, timesteps, sample.ndim).to(sample.dtype)
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample
    raise InputError(f"prediction type '{prediction_type}' is not supported by LCM distillation")


class DDIMSolver:
    """The teacher's ODE solver on the skipping-step schedule ``t_i = (i + 1) * k - 1``, ``k = T // N``.

    ``step(x0, eps, index)`` is one deterministic DDIM step from ``t_index`` to ``t_index - k``
    (to alpha_cumprod[0] from the first solver timestep), as diffusers' LCD example.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, num_train_timesteps: int, num_solver_steps: int):
        if not 1 <= num_solver_steps <= num_train_timesteps:
            raise InputError(
                f"lcm.num_ddim_timesteps must be in [1, {num_train_timesteps}] (got {num_solver_steps})"
            )
        self.step_ratio = num_train_timesteps // num_solver_steps
        self.timesteps = torch.arange(1, num_solver_steps + 1, dtype=torch.long) * self.step_ratio - 1
        alphas_cumprod = alphas_cumprod.double()
        self.alphas_cumprod_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]])

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        alpha_prev = _per_sample(self.alphas_cumprod_prev, index, x0.ndim).to(x0.dtype)
        return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps


def consistency_output(
    sample: torch.Tensor, x0: torch.Tensor, timesteps: torch.Tensor, timestep_scaling: float
) -> torch.Tensor:
    """``c_skip(t) x_t + c_out(t) x0``: the consistency function's value at ``(x_t, t)``."""
    c_skip, c_out = boundary_scalings(timesteps, timestep_scaling=timestep_scaling)
    shape = (-1, *([1] * (sample.ndim - 1)))
    return c_skip.reshape(shape).to(sample.dtype) * sample + c_out.reshape(shape).to(sample.dtype) * x0


def consistency_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: float
) -> torch.Tensor:
    """Mean pseudo-Huber ``sqrt(d^2 + c^2) - c`` (quadratic near 0, linear far out), or the MSE."""
    diff = prediction.float() - target.float()
    if loss_type == "l2":
        return (diff**2).mean()
    return (torch.sqrt(diff**2 + huber_c**2) - huber_c).mean()


@torch.no_grad()
def update_target(target_params, online_params, decay: float) -> None:
    """target <- decay * target + (1 - decay) * online (the LCD target network)."""
    for target, online in zip(target_params, online_params, strict=True):
        target.mul_(decay).add_(online.detach().to(target.dtype), alpha=1 - decay)


def check_teacher_schedule(prediction_type: str, alphas_cumprod: torch.Tensor, solver: DDIMSolver) -> None:
    """Refuse a teacher whose outputs LCD cannot turn into x0 and eps on every solver timestep."""
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(
            f"LCM distillation cannot use a teacher with prediction type '{prediction_type}'",
            hint="it handles epsilon and v_prediction teachers",
        )
    zero = [int(t) for t in solver.timesteps if float(alphas_cumprod[t]) <= 0.0]
    if prediction_type == "epsilon" and zero:
        raise InputError(
            f"LCM distillation cannot use an epsilon-prediction teacher with a zero-terminal-SNR schedule: "
            f"x0 = (x - sigma eps) / alpha divides by alpha = 0 at timestep {zero[0]}",
            hint="a zero-terminal-SNR teacher must predict v (the last solver step, t = T - 1, is always used)",
        )


def lcm_scheduler_config(base_config: dict, num_solver_steps: int, timestep_scaling: float) -> dict:
    """An ``LCMScheduler`` config for the teacher's noise schedule (betas, zero-SNR, prediction type)."""
    import inspect

    from diffusers import LCMScheduler

    # Only what LCMScheduler takes (a PNDM config's skip_prk_steps would only draw a warning).
    accepted = inspect.signature(LCMScheduler.__init__).parameters
    config = {k: v for k, v in dict(base_config).items() if k in accepted}
    config.update(original_inference_steps=num_solver_steps, timestep_scaling=timestep_scaling)
    if config.get("rescale_betas_zero_snr"):
        # The zero-SNR step (t = T - 1) must be the first one sampled (Lin et al. 2024).
        config["timestep_spacing"] = "trailing"
    return config


def make_lcm_scheduler(
    base_config: dict, num_solver_steps: int, timestep_scaling: float, alphas_cumprod: torch.Tensor
):
    """The ``LCMScheduler`` a distilled student samples with; refused when it would use other noise levels."""
    from diffusers import LCMScheduler

    config = lcm_scheduler_config(base_config, num_solver_steps, timestep_scaling)
    try:
        scheduler = LCMScheduler.from_config(config)
    except (NotImplementedError, ValueError) as exc:
        raise InputError(f"LCMScheduler cannot follow the teacher's noise schedule: {exc}") from None
    if not torch.allclose(scheduler.alphas_cumprod.double(), alphas_cumprod.double().cpu(), atol=1e-6):
        raise InputError(
            "LCMScheduler cannot reproduce the teacher's noise schedule (its alphas_cumprod differ)",
            hint=f"the teacher's scheduler config: beta_schedule={config.get('beta_schedule')}",
        )
    return scheduler
