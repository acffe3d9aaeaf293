"""Bootstrap intervals: they cover the mean, shrink with more prompts, and pairing narrows differences."""

import numpy as np
import pytest

from distilsd.evaluate.stats import Estimate, bootstrap_mean, paired_difference, verdict


def test_interval_covers_the_mean_and_shrinks_with_more_prompts():
    rng = np.random.default_rng(0)
    small = bootstrap_mean(rng.random(100) < 0.7)
    large = bootstrap_mean(rng.random(1600) < 0.7)
    for estimate in (small, large):
        assert estimate.low < estimate.value < estimate.high
    # The binomial standard error: half-width ~ 1.96 * sqrt(p (1 - p) / n).
    assert large.high - large.low == pytest.approx(2 * 1.96 * np.sqrt(0.21 / 1600), rel=0.15)
    assert (large.high - large.low) < (small.high - small.low) / 3


def test_interval_is_reproducible_and_a_point_for_constant_verdicts():
    values = np.random.default_rng(1).random(200) < 0.5
    assert bootstrap_mean(values) == bootstrap_mean(values)
    assert bootstrap_mean(np.ones(50)) == Estimate(1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_mean([1.0])


def test_pairing_narrows_the_difference_of_correlated_models():
    rng = np.random.default_rng(2)
    hard = rng.random(400) < 0.5  # prompts both models fail on
    first = (~hard) & (rng.random(400) < 0.95)
    second = (~hard) & (rng.random(400) < 0.85)
    paired = paired_difference(first, second)
    separate = [bootstrap_mean(first), bootstrap_mean(second)]
    unpaired_width = 2 * 1.96 * np.hypot(*[(e.high - e.low) / (2 * 1.96) for e in separate])
    assert paired.value == pytest.approx(first.mean() - second.mean())
    assert paired.high - paired.low < 0.8 * unpaired_width
    with pytest.raises(ValueError):
        paired_difference([1, 0, 1], [1, 0])


def test_a_claim_is_met_only_when_its_whole_interval_clears_the_target():
    assert verdict(Estimate(-0.02, -0.04, 0.01), at_least=-0.05) == "met"
    assert verdict(Estimate(-0.04, -0.09, 0.01), at_least=-0.05) == "not shown"
    assert verdict(Estimate(-0.12, -0.16, -0.08), at_least=-0.05) == "missed"
