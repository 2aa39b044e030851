"""The interval functions against cases whose answer is known analytically."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from agd_pipeline import intervals


def test_bootstrap_of_a_binomial_mean_has_the_binomial_standard_error():
    rng = np.random.default_rng(0)
    n, p = 2000, 0.3
    correct = (rng.random(n) < p).astype(float)
    weights = intervals.bootstrap_weights(np.arange(n), replicates=4000, seed=1)
    means = intervals.weighted_mean(correct, weights)
    observed = correct.mean()
    expected_se = math.sqrt(observed * (1 - observed) / n)
    assert means.std() == pytest.approx(expected_se, rel=0.06)
    low, high = intervals.interval(means)
    assert low == pytest.approx(observed - 1.96 * expected_se, abs=0.15 * expected_se)
    assert high == pytest.approx(observed + 1.96 * expected_se, abs=0.15 * expected_se)


def test_cluster_bootstrap_widens_by_the_square_root_of_the_cluster_size():
    # 100 prompts of 16 samples each, all samples of a prompt judged alike: the mean is as variable
    # as a mean over 100 independent samples, not 1600. A bootstrap that ignores the clusters says
    # 4x narrower (sqrt(16)); the cluster bootstrap must not.
    rng = np.random.default_rng(2)
    prompts, per = 100, 16
    outcome = np.repeat((rng.random(prompts) < 0.5).astype(float), per)
    clusters = np.repeat(np.arange(prompts), per)
    observed = outcome.mean()
    clustered = intervals.weighted_mean(outcome, intervals.bootstrap_weights(clusters, 4000, seed=3)).std()
    naive = intervals.weighted_mean(outcome, intervals.bootstrap_weights(np.arange(len(outcome)), 4000, seed=3)).std()
    assert clustered == pytest.approx(math.sqrt(observed * (1 - observed) / prompts), rel=0.07)
    assert naive == pytest.approx(math.sqrt(observed * (1 - observed) / (prompts * per)), rel=0.07)
    assert clustered / naive == pytest.approx(4.0, rel=0.1)


def test_bootstrap_weights_draw_whole_clusters_and_are_reproducible():
    clusters = np.array([5, 5, 7, 7, 7, 9])
    weights = intervals.bootstrap_weights(clusters, replicates=50, seed=4)
    assert weights.shape == (50, 6)
    # every replicate draws three clusters; members of a cluster share its weight
    assert np.all((weights[:, [0, 2, 5]]).sum(axis=1) == 3)
    assert np.all(weights[:, 0] == weights[:, 1]) and np.all(weights[:, 2] == weights[:, 4])
    assert np.array_equal(weights, intervals.bootstrap_weights(clusters, replicates=50, seed=4))
    assert not np.array_equal(weights, intervals.bootstrap_weights(clusters, replicates=50, seed=5))


def test_paired_difference_interval_is_narrower_than_unpaired():
    # two methods that agree on most samples: the paired difference's spread comes from the
    # discordant samples alone (variance (b + c) / n^2 - (b - c)^2 / n^3)
    rng = np.random.default_rng(6)
    n = 1000
    a = (rng.random(n) < 0.95).astype(float)
    b = a.copy()
    flip = rng.choice(n, 30, replace=False)
    b[flip] = 1 - b[flip]
    weights = intervals.bootstrap_weights(np.arange(n), 4000, seed=7)
    diff = intervals.weighted_mean(a - b, weights)
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    expected = math.sqrt((only_a + only_b) / n ** 2 - (only_a - only_b) ** 2 / n ** 3)
    assert diff.std() == pytest.approx(expected, rel=0.07)


@pytest.mark.parametrize("only_a,only_b", [(10, 2), (0, 0), (7, 7), (0, 9), (25, 13)])
def test_mcnemar_exact_equals_the_binomial_test_on_discordant_pairs(only_a, only_b):
    expected = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert intervals.mcnemar_exact(only_a, only_b) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_exact_hand_computed():
    # b = 10, c = 2: 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert intervals.mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096, rel=1e-12)


def test_mcnemar_interval_brackets_the_difference_and_maps_clopper_pearson():
    low, high = intervals.mcnemar_interval(12, 4, 600)
    assert low < (12 - 4) / 600 < high
    # at the extremes: all discordant pairs favour A -> the upper end is their share of the samples
    low, high = intervals.mcnemar_interval(5, 0, 100)
    assert high == pytest.approx(5 / 100)
    assert low == pytest.approx((5 / 100) * (2 * 0.025 ** (1 / 5) - 1), rel=1e-9)
    assert intervals.mcnemar_interval(0, 0, 100) == (0.0, 0.0)


def test_fid_and_weighted_moments_agree_with_clean_fid():
    from cleanfid import fid as clean_fid

    rng = np.random.default_rng(8)
    a = rng.normal(size=(400, 12)).astype(np.float32)
    b = (rng.normal(size=(300, 12)) * 1.3 + 0.4).astype(np.float32)
    assert intervals.fid(a, b) == pytest.approx(float(clean_fid.fid_from_feats(a, b)), rel=1e-6)
    # weights of all ones are the set itself
    mean, cov = intervals.weighted_moments(a, np.ones((1, len(a))))
    np.testing.assert_allclose(mean[0], a.astype(np.float64).mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cov[0], np.cov(a.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
    # weights 2 on one row are that row duplicated
    weights = np.ones((1, len(a)))
    weights[0, 3] = 2
    duplicated = np.concatenate([a, a[3:4]])
    np.testing.assert_allclose(intervals.weighted_moments(a, weights)[1][0],
                               np.cov(duplicated.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)


def test_frechet_distance_of_known_gaussians():
    # 1-D: (mu_a - mu_b)^2 + (s_a - s_b)^2
    value = intervals.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]]))
    assert float(value) == pytest.approx(4.0 + 1.0)
    # identical Gaussians: zero
    cov = np.array([[2.0, 0.5], [0.5, 1.0]])
    assert float(intervals.frechet_distance(np.zeros(2), cov, np.zeros(2), cov)) == pytest.approx(0.0, abs=1e-12)


def test_interval_and_estimate():
    values = np.arange(1001, dtype=float)
    assert intervals.interval(values) == pytest.approx((25.0, 975.0))
    assert intervals.estimate(3.0, values) == pytest.approx({"point": 3.0, "low": 25.0, "high": 975.0})


def test_sample_frechet_distance_equals_the_moment_route_without_d_by_d_products():
    """The replicates' Fréchet distances through sample-by-sample products (what makes 2048-d Inception
    features feasible) are those of weighted_moments and frechet_distance: against a resampled set,
    against fixed statistics, and with more dimensions than samples (rank-deficient covariances)."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(30, 5)) * 2 + 3, rng.normal(size=(40, 5)) + 3.5
    weights_a = intervals.bootstrap_weights(np.arange(30) // 3, replicates=40, seed=1)
    weights_b = intervals.bootstrap_weights(np.arange(40), replicates=40, seed=2)
    by_moments = intervals.frechet_distance(*intervals.weighted_moments(a, weights_a),
                                            *intervals.weighted_moments(b, weights_b))
    assert intervals.sample_frechet_distance(a, weights_a, b, weights_b) == pytest.approx(by_moments, rel=1e-10)
    mean, cov = intervals.moments(b)
    fixed = intervals.frechet_distance(*intervals.weighted_moments(a, weights_a), mean[None], cov[None])
    assert intervals.sample_frechet_distance(a, weights_a, mean_b=mean, cov_b=cov) == pytest.approx(fixed, rel=1e-10)
    ones = np.ones((1, 30))
    assert intervals.sample_frechet_distance(a, ones, b, np.ones((1, 40)))[0] == pytest.approx(intervals.fid(a, b),
                                                                                               rel=1e-10)
    # 64 dimensions, 20 and 25 samples: singular covariances (the moment route's eigenvalues of a
    # singular product carry rounding of order sqrt(eps), hence the looser tolerance)
    a, b = rng.normal(size=(20, 64)), rng.normal(size=(25, 64)) + 0.2
    weights_a, weights_b = weights_a[:5, :20], weights_b[:5, :25]
    by_moments = intervals.frechet_distance(*intervals.weighted_moments(a, weights_a),
                                            *intervals.weighted_moments(b, weights_b))
    assert intervals.sample_frechet_distance(a, weights_a, b, weights_b) == pytest.approx(by_moments, rel=1e-6)
