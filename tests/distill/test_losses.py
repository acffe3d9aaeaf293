import pytest
import torch

from distilsd.distill.losses import (
    FeatureRecorder,
    derive_feature_pairs,
    feature_kd_losses,
    min_snr_weights,
    output_kd_loss,
    task_loss,
    unwrap,
)
from distilsd.errors import InputError


class Wrapper(torch.nn.Module):
    """Stands in for DDP (``.module``)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class Compiled(torch.nn.Module):
    """Stands in for torch.compile's OptimizedModule (``._orig_mod``)."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module

    def forward(self, *args, **kwargs):
        return self._orig_mod(*args, **kwargs)


def _unet_inputs(unet, batch=2):
    torch.manual_seed(0)
    config = unet.config
    return (
        torch.randn(batch, 4, 8, 8),
        torch.tensor([10, 500][:batch]),
        torch.randn(batch, 77, config.cross_attention_dim),
    )


def test_hooks_use_checkpoint_names_through_wrappers():
    from distilsd.testing import tiny_unet

    unet = tiny_unet()
    wrapped = Compiled(Wrapper(unet))
    assert unwrap(wrapped) is unet
    # Names as in the checkpoint: no "module." / "_orig_mod." prefix.
    recorder = FeatureRecorder(
        wrapped, ["down_blocks.0", "up_blocks.3", "down_blocks.2.attentions.1.proj_out"]
    )
    sample, t, text = _unet_inputs(unet)
    wrapped(sample, t, encoder_hidden_states=text)
    down0, up3, proj = recorder.take()
    assert down0.shape == (2, 16, 4, 4) and up3.shape == (2, 16, 8, 8) and proj.shape[1] == 32
    assert recorder.features == {}
    recorder.remove()
    with pytest.raises(InputError, match="no module 'module.down_blocks.0'"):
        FeatureRecorder(wrapped, ["module.down_blocks.0"])


def test_feature_norm_balances_layers():
    big_t, big_s = torch.full((1, 4), 100.0), torch.full((1, 4), 90.0)
    small_t, small_s = torch.full((1, 4), 1.0), torch.full((1, 4), 0.9)
    plain = [float(x) for x in feature_kd_losses([big_s, small_s], [big_t, small_t])]
    normed = [float(x) for x in feature_kd_losses([big_s, small_s], [big_t, small_t], norm="teacher")]
    assert plain[0] / plain[1] == pytest.approx(10_000)
    assert normed[0] == pytest.approx(normed[1], rel=1e-4) and normed[0] == pytest.approx(0.01, rel=1e-3)


def test_losses_and_min_snr():
    a, b = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    assert task_loss(a, b) == 1.0 and output_kd_loss(a, 2 * b) == 4.0
    snr = torch.tensor([0.5, 20.0])
    assert torch.allclose(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 0.25]))
    assert torch.allclose(min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5.0 / 21.0]))
    assert task_loss(a, b, torch.tensor([1.0, 0.0])) == 0.5


def test_timestep_sampling_uniform_and_logit_normal():
    from distilsd.distill.losses import sample_timesteps

    # uniform is the draw runs made before the option existed: their resumes stay exact.
    uniform = sample_timesteps("uniform", 1000, 4096, torch.Generator().manual_seed(0))
    assert torch.equal(uniform, torch.randint(0, 1000, (4096,), generator=torch.Generator().manual_seed(0)))
    t = sample_timesteps(
        "logit_normal", 1000, 4096, torch.Generator().manual_seed(0), logit_mean=1.0, logit_std=0.5
    )
    assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) <= 999
    assert float(t.float().median()) == pytest.approx(1000 * torch.sigmoid(torch.tensor(1.0)), abs=10)  # ~731
    within_one_std = ((t >= 622) & (t <= 818)).float().mean()  # sigmoid(1 -+ 0.5) * 1000
    assert float(within_one_std) == pytest.approx(0.683, abs=0.03)
    assert float((uniform >= 622).logical_and(uniform <= 818).float().mean()) < 0.25


def test_derived_pairs_match_bk_tiny_preset():
    from distilsd.compress import build_student, get_layout
    from distilsd.testing import tiny_unet

    teacher = tiny_unet()
    for preset in ("bk-tiny", "bk-small"):
        layout = get_layout(preset, teacher.config)
        student, _ = build_student(teacher, layout, init="teacher")
        assert derive_feature_pairs(teacher, student) == [tuple(p) for p in layout.feature_pairs]
