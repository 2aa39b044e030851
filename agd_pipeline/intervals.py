"""Confidence intervals for evaluation numbers: a paired cluster bootstrap and McNemar's exact test.

Every evaluation number is a statistic of a finite sample set, so it comes with a 95 % interval.
The methods are compared on the same seeds (and prompts), so the bootstrap is *paired*: one draw of
samples serves every method and every w. Samples that share a prompt are not independent, so whole
prompts (clusters) are drawn, not single samples. A draw is expressed as a weight per sample (how
often its cluster was drawn), which turns every statistic into a weighted one and keeps the
bootstrap a few matrix products. Only numpy; the functions take plain arrays so that anyone can
recompute an interval from the per-sample files the evaluate stage writes.
"""

from __future__ import annotations

import math

import numpy as np

CONFIDENCE = 0.95
REPLICATES = 1000


def bootstrap_weights(clusters, replicates: int = REPLICATES, seed: int = 0) -> np.ndarray:
    """[replicates, samples] weights of a cluster bootstrap: each replicate draws as many clusters as
    there are, with replacement; a sample's weight is how often its cluster was drawn. Clusters of
    one sample each give the ordinary bootstrap."""
    ids, index = np.unique(np.asarray(clusters), return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(ids), np.full(len(ids), 1.0 / len(ids)), size=replicates)
    return counts[:, index].astype(np.float64)


def interval(replicates, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates (two-sided, ``confidence`` coverage)."""
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(np.asarray(replicates, dtype=np.float64), [tail, 100 - tail])
    return float(low), float(high)


def estimate(point: float, replicates, confidence: float = CONFIDENCE) -> dict:
    """A number with its interval, as metrics.json stores it."""
    low, high = interval(replicates, confidence)
    return {"point": float(point), "low": low, "high": high}


def weighted_mean(values, weights: np.ndarray) -> np.ndarray:
    """Per replicate, the weighted mean of ``values`` (one per sample)."""
    return weights @ np.asarray(values, dtype=np.float64) / weights.sum(axis=1)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: ``only_a`` samples judged correct
    under method A alone, ``only_b`` under B alone. Under no difference each discordant pair falls
    either way with probability 1/2 (a binomial test on the discordant pairs)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return float(min(1.0, 2 * tail))


def mcnemar_interval(only_a: int, only_b: int, samples: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact interval of the paired accuracy difference acc_A - acc_B, conditional on the number of
    discordant pairs: a Clopper-Pearson interval of the share of them that favour A, mapped to the
    difference (only_a - only_b) / samples."""
    from scipy.stats import beta

    n = only_a + only_b
    if n == 0:
        return 0.0, 0.0
    alpha = 1 - confidence
    low = beta.ppf(alpha / 2, only_a, n - only_a + 1) if only_a > 0 else 0.0
    high = beta.ppf(1 - alpha / 2, only_a + 1, n - only_a) if only_a < n else 1.0
    scale = n / samples
    return float(scale * (2 * low - 1)), float(scale * (2 * high - 1))


def frechet_distance(mean_a, cov_a, mean_b, cov_b) -> np.ndarray:
    """Fréchet distance between Gaussians, batched over leading dimensions:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)). The trace of the matrix square root is the
    sum of the square roots of the eigenvalues of S_a S_b (real and non-negative for covariances;
    rounding can leave tiny negative or imaginary parts, which are dropped)."""
    eig = np.linalg.eigvals(cov_a @ cov_b)
    root_trace = np.sqrt(np.clip(eig.real, 0, None)).sum(axis=-1)
    diff = mean_a - mean_b
    return (diff * diff).sum(axis=-1) + np.trace(cov_a, axis1=-2, axis2=-1) + np.trace(cov_b, axis1=-2, axis2=-1) \
        - 2 * root_trace


def weighted_moments(features, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per replicate, the mean [R, D] and covariance [R, D, D] of ``features`` [N, D] under the
    weights [R, N]: the moments of the resampled set (covariance with the N - 1 denominator, as
    np.cov and clean-fid use)."""
    features = np.asarray(features, dtype=np.float64)
    total = weights.sum(axis=1)
    mean = weights @ features / total[:, None]
    dim = features.shape[1]
    # the weighted sum of outer products as one matrix product: [R, N] @ [N, D*D]
    second = (weights @ (features[:, :, None] * features[:, None, :]).reshape(len(features), dim * dim)
              ).reshape(-1, dim, dim)
    cov = (second - total[:, None, None] * mean[:, :, None] * mean[:, None, :]) / (total - 1)[:, None, None]
    return mean, cov


def moments(features) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def fid(features_a, features_b) -> float:
    """FID between two feature sets (the point estimate the bootstrap replicates scatter around)."""
    return float(frechet_distance(*moments(features_a), *moments(features_b)))
