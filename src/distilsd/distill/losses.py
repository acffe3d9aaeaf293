"""The distillation loss, as pure functions, and forward hooks that record block outputs.

loss = l_task * MSE(student, target) + l_out * MSE(student, teacher)
       + l_feat * sum_i MSE(student_feature_i, teacher_feature_i)        (BK-SDM)

Hooks are registered on the *unwrapped* module (no DDP ``module.`` prefix, no
``torch.compile`` ``_orig_mod.``) by module name, so the names in a preset are the names in
the checkpoint, whatever wraps the model at run time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distilsd.errors import InputError


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP / FSDP-style ``.module`` and ``torch.compile``'s ``._orig_mod``."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model


def _first_tensor(output: Any) -> torch.Tensor:
    """A block's feature: its output, or the first element of a tuple output (BK-SDM)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if hasattr(output, "sample") and not isinstance(output, torch.Tensor):
        output = output.sample
    return output


class FeatureRecorder:
    """Records the outputs of named submodules of ``model`` on every forward."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        base = unwrap(model)
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in names:
            try:
                module = base.get_submodule(name)
            except AttributeError:
                raise InputError(
                    f"feature KD: the model has no module '{name}'",
                    hint="check loss.feature_pairs against the model's module names",
                ) from None
            self._handles.append(module.register_forward_hook(self._hook(name)))
        self.names = list(names)

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.features[name] = _first_tensor(output)

        return hook

    def clear(self) -> None:
        self.features = {}

    def take(self) -> list[torch.Tensor]:
        """The recorded features in ``names`` order (and forget them)."""
        missing = [n for n in self.names if n not in self.features]
        if missing:
            raise RuntimeError(f"feature hooks did not fire for {missing}")
        out = [self.features[n] for n in self.names]
        self.features = {}
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def sample_timesteps(
    method: str,
    num_timesteps: int,
    batch_size: int,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """Training timesteps: uniform, or logit-normal (SD3, Esser et al. 2024) via diffusers.

    The logit-normal draw puts most steps where the noise level decides what the image shows
    and few on the nearly clean and the pure-noise ends.
    """
    if method == "uniform":
        return torch.randint(0, num_timesteps, (batch_size,), generator=generator)
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        method, batch_size, logit_mean=logit_mean, logit_std=logit_std, generator=generator
    )
    return (u * num_timesteps).long().clamp(max=num_timesteps - 1)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample weights of Min-SNR-gamma (Hang et al. 2023), as diffusers' training example."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def task_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE of the prediction against the noise (or velocity), optionally weighted per sample."""
    if weights is None:
        return F.mse_loss(prediction.float(), target.float())
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


def output_kd_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student_out.float(), teacher_out.float())


def feature_kd_losses(
    student_features: list[torch.Tensor], teacher_features: list[torch.Tensor], norm: str = "none"
) -> list[torch.Tensor]:
    """One MSE per matched pair; with ``norm="teacher"`` divided by the teacher feature's mean square."""
    losses = []
    for student, teacher in zip(student_features, teacher_features, strict=True):
        if student.shape != teacher.shape:
            raise InputError(
                f"feature KD: student feature {tuple(student.shape)} does not match teacher feature {tuple(teacher.shape)}"
            )
        loss = F.mse_loss(student.float(), teacher.float())
        if norm == "teacher":
            loss = loss / (teacher.float().pow(2).mean().detach() + 1e-6)
        losses.append(loss)
    return losses


def derive_feature_pairs(
    teacher: torch.nn.Module, student: torch.nn.Module, sample_size: int = 8
) -> list[tuple[str, str]]:
    """Pairs for a student without a preset: block outputs of equal shape, found by a probe forward.

    Down blocks are matched from the input side, up blocks from the output side (a student
    with fewer stages drops the innermost ones). Where a down block's output differs (its
    downsampler was removed), its last attention's ``proj_out`` is tried instead (BK-SDM-Tiny).
    """
    teacher, student = unwrap(teacher), unwrap(student)
    candidates: list[tuple[str, str]] = []
    n_down_t, n_down_s = len(teacher.down_blocks), len(student.down_blocks)
    for i in range(min(n_down_t, n_down_s)):
        candidates.append((f"down_blocks.{i}", f"down_blocks.{i}"))
        t_att, s_att = (
            getattr(teacher.down_blocks[i], "attentions", None),
            getattr(student.down_blocks[i], "attentions", None),
        )
        if t_att and s_att:
            candidates.append(
                (
                    f"down_blocks.{i}.attentions.{len(t_att) - 1}.proj_out",
                    f"down_blocks.{i}.attentions.{len(s_att) - 1}.proj_out",
                )
            )
    n_up_t, n_up_s = len(teacher.up_blocks), len(student.up_blocks)
    for j in range(n_up_s):
        candidates.append((f"up_blocks.{j + n_up_t - n_up_s}", f"up_blocks.{j}"))

    shapes: dict[str, dict[str, tuple]] = {}
    for role, model in (("teacher", teacher), ("student", student)):
        names = sorted({pair[0 if role == "teacher" else 1] for pair in candidates})
        recorder = FeatureRecorder(model, names)
        param = next(model.parameters())
        config = model.config
        with torch.no_grad():
            model(
                torch.zeros(
                    1, config.in_channels, sample_size, sample_size, dtype=param.dtype, device=param.device
                ),
                torch.tensor([10], device=param.device),
                encoder_hidden_states=torch.zeros(
                    1, 77, config.cross_attention_dim, dtype=param.dtype, device=param.device
                ),
            )
        shapes[role] = {name: tuple(recorder.features[name].shape) for name in names}
        recorder.remove()
    pairs = []
    block_matched: set[str] = set()
    for t_name, s_name in candidates:
        if shapes["teacher"][t_name] != shapes["student"][s_name]:
            continue
        block = ".".join(s_name.split(".")[:2])
        if "proj_out" in s_name and block in block_matched:
            continue  # the block output itself matched; the attention is inside it
        if "proj_out" not in s_name:
            block_matched.add(block)
            pairs = [p for p in pairs if not (p[1].startswith(block + ".") and "proj_out" in p[1])]
        pairs.append((t_name, s_name))
    return pairs
