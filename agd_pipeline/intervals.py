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
    from .errors import require

    beta = require("scipy.stats", "the McNemar interval").beta

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


def sample_frechet_distance(features_a, weights_a: np.ndarray, features_b=None, weights_b: np.ndarray | None = None,
                            mean_b=None, cov_b=None) -> np.ndarray:
    """Per replicate, the Fréchet distance between the weighted feature set a ([N, D] under weights
    [R, N]) and either the weighted set b ([M, D] under [R, M]) or the fixed Gaussian (mean_b, cov_b):
    what :func:`frechet_distance` of their :func:`weighted_moments` gives, without D x D products per
    replicate. For features of many dimensions (Inception's 2048) that is what makes 1000 replicates
    feasible: with S_a = A'A and S_b = B'B (A the weighted, centred rows of a; B those of b, or
    L' for cov_b = LL'), tr (S_a S_b)^(1/2) is the sum of the singular values of AB', a matrix of
    drawn samples by drawn samples (or by D)."""
    features_a = np.asarray(features_a, dtype=np.float64)
    fixed = features_b is None
    # FID is unchanged by moving both sets alike: centre on a's mean for the rounding's sake
    shift = features_a.mean(axis=0)
    a = features_a - shift
    if fixed:
        cov_b = np.asarray(cov_b, dtype=np.float64)
        values, vectors = np.linalg.eigh(cov_b)
        cross = a @ (vectors * np.sqrt(np.clip(values, 0, None)))  # A L before weighting: [N, D]
        mean_b = np.asarray(mean_b, dtype=np.float64)[None] - shift
        trace_b = np.full(len(weights_a), np.trace(cov_b))
    else:
        b = np.asarray(features_b, dtype=np.float64) - shift
        cross = a @ b.T  # [N, M]
        mean_b, trace_b = _weighted_mean_and_trace(b, weights_b)
    mean_a, trace_a = _weighted_mean_and_trace(a, weights_a)
    root_trace = np.empty(len(weights_a))
    for r, w_a in enumerate(weights_a):
        rows = np.flatnonzero(w_a)
        m = _centred_scaled(cross[rows], w_a[rows])
        if not fixed:
            cols = np.flatnonzero(weights_b[r])
            m = _centred_scaled(m[:, cols].T, weights_b[r][cols]).T
        root_trace[r] = _nuclear_norm(m)
    diff = mean_a - mean_b
    return (diff * diff).sum(axis=-1) + trace_a + trace_b - 2 * root_trace


def _nuclear_norm(m: np.ndarray) -> float:
    """The sum of the singular values of ``m``, as the square roots of the eigenvalues of its smaller
    Gram matrix (far faster than an SVD). Eigenvalues within rounding of 0 (m's rank is at most D)
    count as 0: their square roots would add rounding noise of the order sqrt(eps)."""
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    values = np.linalg.eigvalsh(gram)
    values[values <= values[-1] * len(values) * np.finfo(np.float64).eps] = 0
    return float(np.sqrt(values).sum())


def _weighted_mean_and_trace(features: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per replicate, the weighted mean [R, D] and the trace of the weighted covariance [R] (N - 1
    denominator, as :func:`weighted_moments`)."""
    total = weights.sum(axis=1)
    mean = weights @ features / total[:, None]
    second = weights @ (features * features).sum(axis=1)
    return mean, (second - total * (mean * mean).sum(axis=1)) / (total - 1)


def _centred_scaled(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Rows minus their weighted mean, each scaled by sqrt(weight / (total - 1)): A with A'A the
    weighted covariance."""
    total = weights.sum()
    return (rows - weights @ rows / total) * np.sqrt(weights / (total - 1))[:, None]
