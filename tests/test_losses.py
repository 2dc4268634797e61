"""Properties of the loss functions (docs/algorithm.md §3, 5, 6)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from abd_jax import losses


def _rand(key, shape):
    return jax.random.normal(jax.random.PRNGKey(key), shape)


class LossesTest(chex.TestCase, parameterized.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_bn_stat_kl_zero_iff_stats_match(self):
        kl = self.variant(losses.bn_stat_kl)
        mean, var = _rand(0, (16,)), jnp.abs(_rand(1, (16,))) + 0.1
        np.testing.assert_allclose(kl(mean, var, mean, var), 0.0, atol=1e-6)
        assert kl(mean + 0.5, var, mean, var) > 0
        assert kl(mean, var * 2, mean, var) > 0

    @chex.variants(with_jit=True, without_jit=True)
    def test_diversity_bounds(self):
        div = self.variant(losses.diversity_loss)
        uniform_mean = jnp.eye(5) * 10.0  # each class predicted once -> p_bar uniform-ish
        assert float(div(uniform_mean)) < 1e-3
        collapsed = jnp.tile(jnp.array([[50.0, 0, 0, 0, 0]]), (8, 1))
        np.testing.assert_allclose(div(collapsed), 1.0, atol=1e-5)

    def test_masked_forms_equal_sliced_forms(self):
        logits, teacher = _rand(2, (4, 10)), _rand(3, (4, 10))
        labels = jnp.array([6, 7, 6, 5])
        num_old, num_new = 5, 8
        sliced = losses.kd_loss(logits[:, :num_old], teacher[:, :num_old], 2.0)
        masked = losses.kd_loss(losses.mask_logits(logits, 0, num_old),
                                losses.mask_logits(teacher, 0, num_old), 2.0)
        np.testing.assert_allclose(sliced, masked, rtol=1e-6)
        w = losses.task_balancing_weights(labels, num_old, num_new)
        np.testing.assert_allclose(
            losses.local_ce_loss(logits[:, :num_new], labels, num_old, w),
            losses.local_ce_loss(losses.mask_logits(logits, 0, num_new), labels, num_old, w),
            rtol=1e-6)
        np.testing.assert_allclose(
            losses.lwf_mc_loss(logits[:, :num_new], labels, teacher[:, :num_old]),
            losses.lwf_mc_loss(logits, labels, teacher, num_old=num_old, num_valid=num_new),
            rtol=1e-6)
        np.testing.assert_allclose(
            losses.diversity_loss(logits[:, :num_new]),
            losses.diversity_loss(losses.mask_logits(logits, 0, num_new), num_valid=num_new),
            rtol=1e-5)

    def test_local_ce_gives_old_heads_no_gradient(self):
        feats, labels = _rand(4, (6, 3)), jnp.array([5, 6, 7, 5, 6, 7])
        kernel = _rand(5, (3, 8))
        grad = jax.grad(lambda k: losses.local_ce_loss(feats @ k, labels, 5, None))(kernel)
        np.testing.assert_array_equal(grad[:, :5], 0.0)
        assert np.abs(grad[:, 5:]).sum() > 0

    def test_feature_kd_sees_only_the_old_head_subspace(self):
        kernel = _rand(6, (4, 2))  # [D, K_old]
        f_t = _rand(7, (3, 4))
        # A change orthogonal to the columns of W is ignored.
        null = jnp.linalg.svd(kernel.T)[2][-1]  # vector with kernel.T @ null = 0
        f_s = f_t + 3.0 * null[None, :]
        np.testing.assert_allclose(losses.feature_kd_loss(f_s, f_t, kernel), 0.0, atol=1e-8)
        assert losses.feature_kd_loss(f_t + _rand(8, (3, 4)), f_t, kernel) > 0
        # Hand computation: mean_i sum_k ((f_s - f_t) W)_ik^2 / K_old.
        d = _rand(9, (3, 4))
        expected = np.mean(np.sum(np.square(np.asarray(d @ kernel)), axis=1)) / 2
        np.testing.assert_allclose(losses.feature_kd_loss(f_t + d, f_t, kernel), expected,
                                   rtol=1e-5)

    def test_kd_and_lwf_mc_match_hand_computation(self):
        s, t = np.array([[1.0, 2.0, 0.5]]), np.array([[0.2, 1.0, 3.0]])
        p = np.exp(t / 2) / np.exp(t / 2).sum()
        log_q = s / 2 - np.log(np.exp(s / 2).sum())
        np.testing.assert_allclose(losses.kd_loss(s, t, 2.0), -(p * log_q).sum(), rtol=1e-5)
        z, y, teacher = np.array([[0.3, -1.0, 2.0]]), np.array([2]), np.array([[0.5]])
        target = np.array([1 / (1 + np.exp(-0.5)), 0.0, 1.0])
        sig = 1 / (1 + np.exp(-z[0]))
        bce = -(target * np.log(sig) + (1 - target) * np.log(1 - sig)).sum()
        np.testing.assert_allclose(losses.lwf_mc_loss(z, y, teacher), bce, rtol=1e-5)

    def test_task_balancing_weights(self):
        w = losses.task_balancing_weights(jnp.array([0, 4, 5, 9]), 5, 10)
        np.testing.assert_allclose(w, [0.5, 0.5, 0.5, 0.5])
        w = losses.task_balancing_weights(jnp.array([0, 9]), 8, 10)
        np.testing.assert_allclose(w, [0.8, 0.2], rtol=1e-6)

    def test_smoothness_zero_on_constant_positive_on_noise(self):
        const = jnp.ones((2, 8, 8, 3)) * 0.7
        np.testing.assert_allclose(losses.smoothness_loss(const), 0.0, atol=1e-10)
        assert losses.smoothness_loss(_rand(10, (2, 8, 8, 3))) > 0.1

    def test_content_loss_is_ce_against_argmax(self):
        logits = _rand(11, (5, 4)) * 1e3
        log_p = jax.nn.log_softmax(logits / 1e3)
        expected = -np.mean(np.take_along_axis(np.asarray(log_p),
                                               np.argmax(logits, 1)[:, None], 1))
        np.testing.assert_allclose(losses.content_loss(logits, 1e3), expected, rtol=1e-5)


def test_lwf_mc_without_a_teacher_is_bce_on_one_hot_targets():
    """LwF.MC's task 1 (docs/algorithm.md §6, as the release): sum of BCEs against one-hot labels
    over the valid columns / B, not softmax CE."""
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 6)) * 3
    labels = jnp.array([0, 2, 1, 3])
    z, t = logits[:, :4], jax.nn.one_hot(labels, 4)
    want = -jnp.sum(t * jax.nn.log_sigmoid(z) + (1 - t) * jax.nn.log_sigmoid(-z)) / 4
    got = losses.lwf_mc_loss(logits, labels, None, num_valid=4)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert abs(float(got) - float(losses.valid_ce_loss(logits, labels, 4))) > 1e-2


def test_deepinversion_target_is_zero_over_the_new_classes():
    student = jax.random.normal(jax.random.PRNGKey(1), (3, 8))
    teacher = jax.random.normal(jax.random.PRNGKey(2), (3, 8))
    target = jnp.concatenate([jax.nn.softmax(teacher[:, :2] / 2.0), jnp.zeros((3, 3))], axis=1)
    want = jnp.mean(-jnp.sum(target * jax.nn.log_softmax(student[:, :5] / 2.0), axis=1))
    got = losses.padded_soft_kd_loss(student, teacher, 2, 5, 2.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_bn_alignment_averages_the_layer_kls():
    one = (jnp.zeros(3), jnp.ones(3), jnp.zeros(3), jnp.ones(3))
    two = (jnp.ones(2), 2 * jnp.ones(2), jnp.zeros(2), jnp.ones(2))
    want = (losses.bn_stat_kl(*one) + losses.bn_stat_kl(*two)) / 2
    np.testing.assert_allclose(losses.bn_alignment_loss([one, two]), want, rtol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        losses.bn_alignment_loss([])
