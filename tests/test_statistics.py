"""Class statistics and the heads that score with them (docs/algorithm.md §11), against values
worked by hand and explicit loops: NCM, FeCAM's Tukey transform, shrinkage, correlation
normalisation, pseudo-inverse and Mahalanobis distance, FeTrIL's pseudo-features."""
import jax.numpy as jnp
import numpy as np
import pytest

from abd_jax import losses


def test_tukey_is_a_power_or_the_log():
    x = np.array([[4.0, 0.25, 0.0, -1.0]])
    np.testing.assert_allclose(losses.tukey(x, 0.5), [[2.0, 0.5, 0.0, 0.0]])
    np.testing.assert_allclose(losses.tukey(jnp.asarray(x[:, :2]), 0.0), [np.log([4.0, 0.25])],
                               rtol=1e-6)


def test_shrinkage_by_hand():
    """S = [[4, 1, 0], [1, 2, -3], [0, -3, 6]]: mean diagonal 4, mean nonzero off-diagonal
    (1 + 1 - 3 - 3) / 4 = -1 (the zeros are not counted)."""
    s = np.array([[4.0, 1.0, 0.0], [1.0, 2.0, -3.0], [0.0, -3.0, 6.0]])
    want = np.array([[8.0, 0.0, -1.0], [0.0, 6.0, -4.0], [-1.0, -4.0, 10.0]])
    np.testing.assert_allclose(losses.shrink_covariance(s), want)
    np.testing.assert_allclose(losses.shrink_covariance(s, 0.5, 2.0),
                               s + 2.0 * np.eye(3) - 2.0 * (1 - np.eye(3)))


def test_correlation_by_hand_and_a_zero_variance_gives_no_nan():
    s = np.array([[4.0, 2.0], [2.0, 9.0]])
    np.testing.assert_allclose(losses.correlation(s), [[1.0, 1 / 3], [1 / 3, 1.0]])
    z = losses.correlation(np.array([[0.0, 0.0], [0.0, 4.0]]))
    np.testing.assert_array_equal(z, [[0.0, 0.0], [0.0, 1.0]])


def test_fecam_precision_shrinks_twice_normalises_and_survives_a_singular_class():
    rng = np.random.RandomState(0)
    f = rng.rand(7, 3)
    cov = np.cov(f.T)
    for _ in range(2):
        cov = losses.shrink_covariance(cov)
    want = np.linalg.pinv(losses.correlation(cov))
    np.testing.assert_allclose(losses.fecam_precision(f), want, rtol=1e-5)
    # one image (no covariance), or identical images: finite, no NaN
    for singular in (f[:1], np.repeat(f[:1], 4, axis=0)):
        p = losses.fecam_precision(singular)
        assert p.dtype == np.float32 and np.isfinite(p).all()


def test_ncm_ranks_by_the_distance_of_unit_vectors():
    x = jnp.array([[3.0, 4.0], [0.0, 2.0]])
    means = jnp.array([[6.0, 8.0], [1.0, 0.0], [0.0, 5.0]])
    s = np.asarray(losses.ncm_scores(x, means, 2))
    # x0 = (0.6, 0.8): 0 to class 0, |(0.6 - 1, 0.8)|^2 = 0.8 to class 1; class 2 not valid
    np.testing.assert_allclose(s[0, :2], [0.0, -0.8], atol=1e-6)
    assert s[0, 2] == losses.NEG_INF and s.argmax(-1).tolist() == [0, 0]
    np.testing.assert_allclose(s[1, :2], [-0.4, -2.0], atol=1e-6)  # x1 = (0, 1)


def test_fecam_scores_equal_an_explicit_loop_over_classes():
    rng = np.random.RandomState(1)
    n, c, d = 5, 4, 3
    x, means = rng.rand(n, d) + 0.1, rng.rand(c, d) + 0.1
    precisions = np.stack([losses.fecam_precision(rng.rand(6, d)) for _ in range(c)])
    got = np.asarray(losses.fecam_scores(jnp.asarray(x, jnp.float32),
                                         jnp.asarray(means, jnp.float32),
                                         jnp.asarray(precisions), 0.5, 3))
    for i in range(n):
        v = x[i] / (np.linalg.norm(x[i]) + 1e-8)
        v = np.sqrt(v) / np.linalg.norm(np.sqrt(v))
        for k in range(3):
            mu = np.sqrt(means[k]) / np.linalg.norm(np.sqrt(means[k]))
            diff = v - mu
            assert got[i, k] == pytest.approx(-(diff @ precisions[k] @ diff), rel=1e-4)
    assert (got[:, 3] == losses.NEG_INF).all()


def test_fetril_translates_the_nearest_new_class():
    """Past classes 0, 1; new classes 2, 3. Means: 0 (0, 0), 1 (10, 0), 2 (1, 0), 3 (9, 1).
    Euclidean: 0 -> 2, 1 -> 3; each feature x of the chosen class becomes x - mu_n + mu_p."""
    means = np.array([[0.0, 0.0], [10.0, 0.0], [1.0, 0.0], [9.0, 1.0]])
    features = np.array([[1.0, 1.0], [1.0, -1.0], [9.0, 1.0]])
    labels = np.array([2, 2, 3])
    x, y, nearest = losses.fetril_pseudo_features(features, labels, means, 2)
    assert nearest.tolist() == [2, 3] and y.tolist() == [0, 0, 1]
    np.testing.assert_allclose(x, [[0.0, 1.0], [0.0, -1.0], [10.0, 0.0]])
    # cosine similarity of the means (PyCIL's port): (1, 0) is closest in angle to (10, 0)
    means_c = np.array([[1.0, 1.0], [10.0, 0.0], [5.0, 0.0], [1.0, 2.0]])
    assert losses.fetril_pseudo_features(features, labels, means_c, 2,
                                         "cosine")[2].tolist() == [3, 2]
    with pytest.raises(ValueError, match="euclidean"):
        losses.fetril_pseudo_features(features, labels, means, 2, "manhattan")
