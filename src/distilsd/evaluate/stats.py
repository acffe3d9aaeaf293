"""Confidence intervals for evaluation scores: the percentile bootstrap (scipy's).

Alignment is a mean of per-prompt 0/1 verdicts, so how far it can move with another draw of
prompts is what decides whether a 0.05 margin means anything. Two models compared on the same
prompts and seeds are compared pairwise: the interval of the mean per-prompt difference
(resampling prompts, keeping each prompt's two verdicts together), which is narrower than two
separate intervals because the prompts both models find hard cancel out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 10_000


@dataclass(frozen=True)
class Estimate:
    """A mean and its bootstrap interval."""

    value: float
    low: float
    high: float

    def to_json(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}

    def __format__(self, spec: str) -> str:
        spec = spec or ".3f"
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def bootstrap_mean(
    values, *, seed: int = 0, resamples: int = RESAMPLES, confidence: float = CONFIDENCE
) -> Estimate:
    """The mean of ``values`` with its percentile-bootstrap interval (resampling the values)."""
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=float)
    if data.ndim != 1 or len(data) < 2:
        raise ValueError(f"a bootstrap needs at least 2 values, got {data.size}")
    if np.all(data == data[0]):  # every resample has the same mean
        return Estimate(float(data[0]), float(data[0]), float(data[0]))
    result = bootstrap(
        (data,), np.mean, confidence_level=confidence, n_resamples=resamples, method="percentile",
        vectorized=True, rng=np.random.default_rng(seed),
    )  # fmt: skip
    interval = result.confidence_interval
    return Estimate(float(data.mean()), float(interval.low), float(interval.high))


def proportion(successes: int, trials: int, *, confidence: float = CONFIDENCE) -> Estimate:
    """A fraction ``successes / trials`` with its Wilson score interval (sound near 0 and 1, unlike the bootstrap)."""
    from scipy.stats import binomtest

    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(
            f"a proportion needs 0 <= successes <= trials and trials >= 1, got {successes}/{trials}"
        )
    interval = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    return Estimate(successes / trials, float(interval.low), float(interval.high))


def paired_difference(first, second, **options) -> Estimate:
    """Mean of ``first - second`` over paired items (same prompt and seed), with its interval."""
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} and {b.shape}")
    return bootstrap_mean(a - b, **options)


def verdict(estimate: Estimate, *, at_least: float) -> str:
    """'met' when the whole interval is at or above ``at_least``, 'missed' when it is all below, else 'not shown'."""
    if estimate.low >= at_least:
        return "met"
    if estimate.high < at_least:
        return "missed"
    return "not shown"
