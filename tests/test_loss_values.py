"""Loss values pinned to docs/algorithm.md's equations (§N: its section N).

Expected numbers are worked out by hand (stated in the comments) or with plain float64 numpy
arithmetic written out here from the formula; no test compares a loss with another copy
of the implementation. Sections: hand values with their gradients; randomized properties and
gradient masks; ABD's Table-3 switches and the method losses (ABD, DeepInversion, LwF,
LwF + synthetic data, LwF.MC) on a tiny real classifier and generator.
"""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from abd_jax import losses, train
from abd_jax.methods import abd, deepinversion, lwf
from abd_jax.methods.synthetic_replay import ReplayState, replay
from abd_jax.methods.teacher import FrozenModel, TeacherState
from abd_jax.synthesis import frozen_apply
from helpers import TinyGenerator, TinyNet

# One worker runs this file: its module-wide fixtures are built once (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("loss_values")


LN2, LN3 = math.log(2.0), math.log(3.0)
HAND = dict(rtol=1e-5, atol=1e-6)  # float32 against a hand value


def _scalar(x):
    """A loss is a finite float32 0-d array."""
    chex.assert_shape(x, ())
    chex.assert_type(x, jnp.float32)
    chex.assert_tree_all_finite(x)
    return float(x)


def _close(got, want, **tol):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **(tol or HAND))


# ----------------------------------------------------------------- float64 numpy references


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def _np_softmax(z):
    return np.exp(_np_log_softmax(z))


def _np_ce(z, y):
    """[B] -log softmax(z_i)_{y_i}."""
    return -_np_log_softmax(z)[np.arange(len(y)), np.asarray(y)]


def _np_kd(s, t, temp):
    """§6: mean_i -sum_k softmax(t_i/T)_k log_softmax(s_i/T)_k, no T^2."""
    return np.mean(-np.sum(_np_softmax(np.asarray(t, np.float64) / temp)
                           * _np_log_softmax(np.asarray(s, np.float64) / temp), axis=-1))


def _np_softplus(z):
    z = np.asarray(z, np.float64)
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))


def _np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def _f32(*arrays):
    return [jnp.asarray(a, jnp.float32) for a in arrays]


# ========================================================= 1. hand values and their gradients
# Each test evaluates its losses in one jitted call (eager dispatch compiles every op).


def test_bn_stat_kl_hand_values():
    """§3: KL(N(mu_r, v_r) || N(mu_b, v_b)) = log(sd_b/sd_r) - (1 - (v_r + dmu^2)/v_b)/2."""
    one, four, zero = jnp.ones(1), 4.0 * jnp.ones(1), jnp.zeros(1)
    kl = losses.bn_stat_kl
    out = jax.jit(lambda: dict(
        run4=kl(zero, one, zero, four), run1=kl(zero, four, zero, one),
        dmu=kl(zero, one, one, one), dmu_neg=kl(one, one, zero, one),
        mixed=kl(jnp.array([0.0, 0.0, 0.0]), jnp.array([1.0, 4.0, 1.0]),
                 jnp.array([0.0, 0.0, 1.0]), jnp.array([4.0, 1.0, 1.0])),
        const=kl(zero, zero, zero + 1e-4, zero)))()
    # equal means, var_batch 1, var_running 4: log(1/2) - 0.5 (1 - 4) = 1.5 - ln 2 = 0.8068528
    _close(_scalar(out["run4"]), 1.5 - LN2)
    # swapped (KL is not symmetric): var_batch 4, var_running 1: ln 2 - 0.375 = 0.3181472
    _close(out["run1"], LN2 - 0.375)
    # unit variances, mu_run - mu_b = 1: 0 - 0.5 (1 - 2) = 0.5; the sign of dmu is irrelevant
    _close(out["dmu"], 0.5)
    _close(out["dmu_neg"], 0.5)
    # channel mean of the three: (1.5 - ln 2 + ln 2 - 0.375 + 0.5) / 3 = 13/24 = 0.5416667
    _close(_scalar(out["mixed"]), 13.0 / 24.0)
    # 1e-8 on both variances: a constant channel (v_b = v_r = 0) with dmu = 1e-4 gives
    # 0 - 0.5 (1 - (1e-8 + 1e-8) / 1e-8) = 0.5, not inf/nan.
    _close(_scalar(out["const"]), 0.5, rtol=1e-3)


def test_bn_alignment_is_the_plain_layer_mean_of_hand_kls():
    """§3: L_stat = (1/L) sum_l KL_l; layers of 1 and 3 channels are not channel-pooled."""
    layer1 = (jnp.zeros(1), jnp.ones(1), jnp.zeros(1), 4.0 * jnp.ones(1))      # 1.5 - ln 2
    layer2 = (jnp.zeros(3), jnp.ones(3), jnp.array([1.0, 1.0, 0.0]), jnp.ones(3))  # 1/3
    got = jax.jit(losses.bn_alignment_loss)([layer1, layer2])
    _close(_scalar(got), (1.5 - LN2 + 1.0 / 3.0) / 2)


def _hand_blur_1d(sigma=1.0):
    """g_i = exp(-((i - 2) / (2 sigma))^2), i = 0..4, normalised to sum 1 (float64)."""
    g = np.array([math.exp(-((i - 2) / (2 * sigma)) ** 2) for i in range(5)])
    return g / g.sum()


def test_blur_kernel_hand_values():
    """§3: k = g g^T / (sum g)^2 with g_i = exp(-((i - 2) / (2 sigma))^2), sigma = 1."""
    # g = [e^-1, e^-1/4, 1, e^-1/4, e^-1] = [0.3678794, 0.7788008, 1, ...], sum s = 3.2933604
    kernel, kernel2 = jax.jit(lambda: (losses.synthesis._blur_kernel(), losses.synthesis._blur_kernel(2.0)))()
    chex.assert_shape(kernel, (5, 5))
    chex.assert_type(kernel, jnp.float32)
    g = _hand_blur_1d()
    _close(g, [0.1117034, 0.2364760, 0.3036412, 0.2364760, 0.1117034], rtol=1e-6)
    _close(kernel, np.outer(g, g))
    _close(kernel[2, 2], 0.0921980, rtol=1e-6)   # 1 / s^2
    _close(kernel[0, 0], 0.0124776, rtol=1e-5)   # e^-2 / s^2
    _close(kernel[1, 2], 0.0718039, rtol=1e-6)   # e^-1/4 / s^2
    _close(np.sum(np.asarray(kernel, np.float64)), 1.0)
    # sigma = 2: g = [e^-1/4, e^-1/16, 1, e^-1/16, e^-1/4] (the 2 sigma in the denominator)
    g2 = np.array([math.exp(-0.25), math.exp(-1 / 16), 1.0, math.exp(-1 / 16), math.exp(-0.25)])
    _close(kernel2, np.outer(g2, g2) / g2.sum() ** 2)


def test_smoothness_of_a_centred_delta_hand_value():
    """§3: mean((x - blur x)^2). A unit delta in the middle of a 9x9 image blurs into the
    kernel itself, so the loss is ((1 - k_22)^2 + sum_{(i,j) != (2,2)} k_ij^2) / 81."""
    x = jnp.zeros((1, 9, 9, 1)).at[0, 4, 4, 0].set(1.0)
    s = 1.0 + 2 * math.exp(-0.25) + 2 * math.exp(-1.0)
    sum_g2 = (1.0 + 2 * math.exp(-0.5) + 2 * math.exp(-2.0)) / s ** 2  # sum_i g_i^2
    k22 = 1.0 / s ** 2
    want = (1.0 - 2 * k22 + sum_g2 ** 2) / 81.0  # (1 - 0.1843960 + 0.0524388) / 81 = 0.0107166
    _close(want, 0.0107166, rtol=1e-5)
    _close(_scalar(jax.jit(losses.smoothness_loss)(x)), want)


def test_smoothness_uses_reflect_padding():
    """A delta at (1, 1): with reflect padding (row -1 = row 1) pixel (0, 0) of the blur is
    k11 + k13 + k31 + k33 = 4 k11; zero padding gives a loss about 1% lower."""
    x = np.zeros((6, 6))
    x[1, 1] = 1.0
    k = np.outer(_hand_blur_1d(), _hand_blur_1d())

    def blur(padded):
        return np.array([[np.sum(padded[i:i + 5, j:j + 5] * k) for j in range(6)]
                         for i in range(6)])

    blurred = blur(np.pad(x, 2, mode="reflect"))
    _close(blurred[0, 0], 4 * k[1, 1], rtol=1e-12)
    want = np.mean(np.square(x - blurred))
    _close(jax.jit(losses.smoothness_loss)(jnp.asarray(x[None, :, :, None], jnp.float32)), want)
    assert abs(np.mean(np.square(x - blur(np.pad(x, 2)))) - want) > 1e-4


def test_diversity_hand_value():
    """§3: L_div = 1 + sum_k p_bar_k log p_bar_k / log K, p_bar the batch-mean softmax."""
    # rows softmax to [.7, .1, .1, .1] and [.1, .1, .1, .7]: p_bar = [.4, .1, .1, .4];
    # 1 + (0.8 ln .4 + 0.2 ln .1) / ln 4 = 1 - 1.1935496 / 1.3862944 = 0.1390360
    p = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])
    logits = jnp.asarray(np.log(p), jnp.float32)
    wide = jnp.concatenate([logits, jnp.full((2, 3), 7.0)], axis=1)
    plain, masked, squared = jax.jit(lambda: (
        losses.diversity_loss(logits),
        losses.diversity_loss(losses.mask_logits(wide, 0, 4), num_valid=4),
        losses.diversity_loss(2 * logits)))()
    want = 1.0 + (0.8 * math.log(0.4) + 0.2 * math.log(0.1)) / math.log(4.0)
    _close(want, 0.1390360, rtol=1e-6)
    _close(_scalar(plain), want)
    _close(masked, want)  # the masked full-width form with num_valid = K
    assert abs(float(squared) - want) > 1e-2  # no temperature inside the softmax


def test_soft_kd_hand_values():
    """§6: mean_i -sum_k p_ik log_softmax(s_i / T)_k, T divides the student logits."""
    # T = 2. Row 1: s/T = [0, ln 3] -> q = [1/4, 3/4], p = [1/2, 1/2]:
    #   -(ln(1/4) + ln(3/4)) / 2 = 0.8369882. Row 2: s = 0, p = [1, 0]: ln 2. Mean 0.7650677.
    s = jnp.array([[0.0, 2 * LN3], [0.0, 0.0]])
    p = jnp.array([[0.5, 0.5], [1.0, 0.0]])
    (val, grad), doubled = jax.jit(lambda: (
        jax.value_and_grad(losses.soft_kd_loss)(s, p, 2.0),
        losses.soft_kd_loss(s, 2 * p, 2.0)))()
    want = (0.5 * (math.log(4) + math.log(4 / 3)) + LN2) / 2
    _close(_scalar(val), want)
    # d/ds = (softmax(s/T) - p) / (T B): row 1 [-1/4, 1/4] / 4, row 2 [-1/2, 1/2] / 4
    _close(grad, [[-0.0625, 0.0625], [-0.125, 0.125]])
    # the target is used as given (not renormalised): twice the target, twice the loss
    _close(doubled, 2 * want)


def test_kd_hand_value_has_no_t_squared():
    """§6: KD(s, t, T) = mean_i -sum_k softmax(t/T)_k log_softmax(s/T)_k, not times T^2."""
    s, t = jnp.array([[0.0, 2 * LN3]]), jnp.array([[2 * LN3, 0.0]])
    (val, (gs, gt)), (at_t, g_at_t) = jax.jit(lambda: (
        jax.value_and_grad(losses.kd_loss, argnums=(0, 1))(s, t, 2.0),
        jax.value_and_grad(losses.kd_loss)(t, t, 2.0)))()
    # s/T = [0, ln 3], t/T = [ln 3, 0]: p = [3/4, 1/4], q = [1/4, 3/4]
    # -(3/4 ln(1/4) + 1/4 ln(3/4)) = 1.1116413 (with T^2 it would be 4.4465652)
    _close(_scalar(val), 0.75 * math.log(4) + 0.25 * math.log(4 / 3))
    _close(gs, [[(0.25 - 0.75) / 2, (0.75 - 0.25) / 2]])  # (q - p) / (T B)
    np.testing.assert_array_equal(gt, 0.0)  # no gradient reaches the teacher
    # at s = t: the entropy of p, -(3/4 ln 3/4 + 1/4 ln 1/4) = 0.5623351, gradient 0
    _close(at_t, -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    _close(g_at_t, [[0.0, 0.0]], atol=1e-7)


def test_content_loss_hand_value():
    """§3: L_content = CE(z / T, argmax z), T = 1e3."""
    # z/T = [3, 0, 0] (label 0): ln(1 + 2 e^-3) = 0.0949230
    # z/T = [0, 1, 2] (label 2): ln(1 + e^-1 + e^-2) = 0.4076060; mean 0.2512645
    z = jnp.array([[3000.0, 0.0, 0.0], [0.0, 1000.0, 2000.0]])
    val, grad = jax.jit(jax.value_and_grad(losses.content_loss), static_argnums=1)(z, 1e3)
    want = (math.log(1 + 2 * math.exp(-3)) + math.log(1 + math.exp(-1) + math.exp(-2))) / 2
    _close(want, 0.2512645, rtol=1e-6)
    _close(_scalar(val), want)
    # d/dz = (softmax(z/T) - onehot(argmax)) / (T B): the labels carry no gradient
    q = _np_softmax(np.asarray(z, np.float64) / 1e3)
    _close(grad, (q - np.eye(3)[[0, 2]]) / (1e3 * 2), rtol=1e-5, atol=1e-10)


def test_feature_kd_hand_value_and_gradients():
    """§5: L_kd = mean_i sum_k ((f_i - f_T_i) W_prev)_k^2 / K_old, W_prev and f_T frozen."""
    # D = 3, K_old = 2. f - f_T = [[1, 0, 0], [0, 2, 0]], W = [[1, 2], [3, 4], [5, 6]]:
    # projections [1, 2] and [6, 8], squared sums 5 and 100, mean 52.5, / K_old -> 26.25
    f_t = jnp.array([[0.5, -1.0, 3.0], [2.0, 0.0, -2.0]])
    f_s = f_t + jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    w = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    wide = jnp.concatenate([w, jnp.array([[9.0], [-9.0], [1.0]])], axis=1)  # column 2: new
    sliced, (val, (gs, gt, gw)) = jax.jit(lambda: (
        losses.feature_kd_loss(f_s, f_t, w),
        jax.value_and_grad(lambda a, b, c: losses.feature_kd_loss(a, b, c, num_old=2),
                           argnums=(0, 1, 2))(f_s, f_t, wide)))()
    _close(_scalar(sliced), 26.25)
    _close(_scalar(val), 26.25)
    # d/df_s = 2 (d W) W^T / (B K_old): [1, 2] W^T = [5, 11, 17] -> [2.5, 5.5, 8.5];
    # [6, 8] W^T = [22, 50, 78] -> [11, 25, 39]. Nothing reaches f_T or W.
    _close(gs, [[2.5, 5.5, 8.5], [11.0, 25.0, 39.0]])
    np.testing.assert_array_equal(gt, 0.0)
    np.testing.assert_array_equal(gw, 0.0)


def test_task_balancing_weights_hand_values():
    """§5: r = K_old / K_new; w = r for y < K_old, 1 - r otherwise."""
    tb = losses.task_balancing_weights
    w, w_traced, w_first = jax.jit(lambda: (
        tb(jnp.array([0, 1, 2, 5]), 2, 6),                   # r = 1/3
        tb(jnp.array([2, 3, 4]), jnp.int32(3), jnp.int32(4)),  # y = K_old is new
        tb(jnp.array([0, 3]), 0, 4)))()                      # task 1: K_old = 0
    chex.assert_shape(w, (4,))
    chex.assert_type(w, jnp.float32)
    _close(w, [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    _close(w_traced, [0.75, 0.25, 0.25])
    _close(w_first, [1.0, 1.0])


def test_local_ce_hand_value_and_gradient():
    """§5: mean_i w_i CE(z_i[K_old:K_new], y_i - K_old); old columns get zero gradient."""
    z = jnp.array([[5.0, -3.0, 0.0, LN3], [9.0, 9.0, 0.0, 0.0]])
    y, w = jnp.array([3, 2]), jnp.array([0.5, 2.0])
    (val, grad), global_ce = jax.jit(lambda: (
        jax.value_and_grad(losses.local_ce_loss)(z, y, 2, w),
        losses.weighted_ce_loss(z, y, w)))()
    # K_old = 2, K_new = 4. Row 1: z[2:] = [0, ln 3] -> [1/4, 3/4], y = 3: -ln(3/4) = 0.2876821
    # Row 2: z[2:] = [0, 0], y = 2: ln 2. Weights [1/2, 2]: (0.1438410 + 1.3862944) / 2
    want = (0.5 * -math.log(0.75) + 2.0 * LN2) / 2
    _close(_scalar(val), want)
    assert abs(float(global_ce) - want) > 1.0  # the old logits are not in the softmax
    # d/dz = w_i (softmax_local - onehot) / B: row 1 0.5 [1/4, -1/4] / 2, row 2 2 [-1/2, 1/2] / 2
    np.testing.assert_array_equal(grad[:, :2], 0.0)
    _close(grad, [[0.0, 0.0, 0.0625, -0.0625], [0.0, 0.0, -0.5, 0.5]])


def test_head_finetune_ce_hand_value_and_gradients():
    """§5: FT-CE = mean_i w_i CE(W sg(f_i) + b over [0, K_new), y_i): head-only gradient."""
    # f = I, W = [[ln 3, 0, 7], [0, ln 3, 7]], b = 0, K_new = 2 (column 2 invalid).
    # Row 1: [ln 3, 0] -> [3/4, 1/4], y = 0: -ln(3/4). Row 2: [0, ln 3] -> [1/4, 3/4], y = 0:
    # ln 4. Weights [1/3, 2/3]: (ln(4/3) / 3 + 2 ln 4 / 3) / 2 = 0.5100451
    f = jnp.eye(2)
    kernel = jnp.array([[LN3, 0.0, 7.0], [0.0, LN3, 7.0]])
    bias = jnp.zeros(3)
    y, w = jnp.array([0, 0]), jnp.array([1 / 3, 2 / 3])
    fn = lambda a, b, c: losses.head_finetune_ce(a, b, c, y, w, 2)
    val, (gf, gk, gb) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(f, kernel, bias)
    want = (math.log(4 / 3) / 3 + 2 * math.log(4) / 3) / 2
    _close(want, 0.5100451, rtol=1e-6)
    _close(_scalar(val), want)
    np.testing.assert_array_equal(gf, 0.0)  # features stopped
    # dW = f^T G, G_i = w_i (softmax - onehot) / B: [-1/24, 1/24, 0], [-1/4, 1/4, 0]
    _close(gk, [[-1 / 24, 1 / 24, 0.0], [-0.25, 0.25, 0.0]])
    _close(gb, [-7 / 24, 7 / 24, 0.0])
    np.testing.assert_array_equal(gk[:, 2], 0.0)
    np.testing.assert_array_equal(gb[2], 0.0)


def test_lwf_mc_hand_value_and_gradients():
    """§6: sum_k BCE(sigmoid(z_k), target_k) / B over [0, K_new); target = sigmoid(t)
    over [0, K_old), one-hot(y) over [K_old, K_new)."""
    z = jnp.array([[1.0, -1.0, 2.0, 5.0]])
    teacher = jnp.array([[LN3, 4.0, -4.0, 0.0]])
    y = jnp.array([1])
    fn = lambda a, b: losses.lwf_mc_loss(a, y, b, num_old=1, num_valid=3)
    (val, (gz, gt)), sliced = jax.jit(lambda: (
        jax.value_and_grad(fn, argnums=(0, 1))(z, teacher),
        losses.lwf_mc_loss(z[:, :3], y, teacher[:, :1])))()
    # teacher [ln 3] -> sigmoid 3/4, y = 1, K_old = 1, K_new = 3. BCE = softplus(z) - target z:
    # (softplus(1) - 3/4) + (softplus(-1) + 1) + softplus(2)
    #     = 0.5632617 + 1.3132617 + 2.1269280 = 4.0034514 (column 3 is not valid)
    sp = lambda v: math.log1p(math.exp(v))
    want = (sp(1) - 0.75) + (sp(-1) + 1.0) + sp(2)
    _close(want, 4.0034514, rtol=1e-6)
    _close(_scalar(val), want)
    _close(sliced, want)
    # d/dz = sigmoid(z) - target over the valid columns, 0 beyond
    sig = lambda v: 1 / (1 + math.exp(-v))
    _close(gz, [[sig(1) - 0.75, sig(-1) - 1.0, sig(2), 0.0]])
    np.testing.assert_array_equal(gt, 0.0)


def test_padded_soft_kd_hand_value():
    """§6 (DeepInversion): target [softmax(t[:K_old]/T), 0, ..., 0] against
    log_softmax(s[:K_new]/T)."""
    s = jnp.array([[0.0, 0.0, 0.0, 8.0]])
    t = jnp.array([[2 * LN3, 0.0, 5.0, 5.0]])
    fn = lambda a, b: losses.padded_soft_kd_loss(a, b, 2, 3, 2.0)
    val, (gs, gt) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(s, t)
    # t[:2] / T = [ln 3, 0] -> target [3/4, 1/4, 0]; s[:3] = 0 -> log(1/3) each: ln 3.
    # (A student restricted to K_old would give ln 2.)
    _close(_scalar(val), LN3)
    # (softmax(s/T) - target) / (T B) = ([1/3, 1/3, 1/3] - [3/4, 1/4, 0]) / 2, column 3: 0
    _close(gs, [[(1 / 3 - 0.75) / 2, (1 / 3 - 0.25) / 2, (1 / 3) / 2, 0.0]])
    np.testing.assert_array_equal(gt, 0.0)


def test_valid_ce_hand_value_and_mask():
    """§5/6: CE over the valid logits [0, K_new); invalid columns never enter."""
    # z[:2] = [ln 3, 0], y = 0: -ln(3/4) = 0.2876821 (column 2 = 10 would dominate otherwise)
    z = jnp.array([[LN3, 0.0, 10.0]])
    fn = lambda a: losses.valid_ce_loss(a, jnp.array([0]), 2)
    val, grad = jax.jit(jax.value_and_grad(fn))(z)
    _close(_scalar(val), -math.log(0.75))
    _close(grad, [[-0.25, 0.25, 0.0]])


# ================================================ 2. randomized properties and gradient masks


def _random_case(seed):
    rs = np.random.RandomState(seed)
    b = rs.randint(1, 7)
    k = rs.randint(3, 10)
    k_new = rs.randint(2, k + 1)
    k_old = rs.randint(1, k_new)
    z = (rs.randn(b, k) * 3).astype(np.float32)
    t = (rs.randn(b, k) * 3).astype(np.float32)
    return rs, b, k, k_old, k_new, z, t


@pytest.mark.parametrize("seed", range(5))
def test_masked_losses_random_values_and_gradient_masks(seed):
    """Every masked loss on random full-width logits equals its formula on the sliced
    columns, and columns outside the loss's range get exactly zero gradient."""
    rs, b, k, k_old, k_new, z_np, t_np = _random_case(seed)
    z, t = _f32(z_np, t_np)
    y_all = jnp.asarray(rs.randint(0, k_new, b))
    y_cur = jnp.asarray(rs.randint(k_old, k_new, b))
    ratio = k_old / k_new
    w_np = np.where(np.asarray(y_all) < k_old, ratio, 1 - ratio)
    temp = 2.0
    mask = losses.mask_logits
    # name: (loss of the full-width logits a given K_old, K_new; the columns [lo, hi) it uses)
    cases = {
        "valid_ce": (lambda a, ko, kn: losses.valid_ce_loss(
            a, y_all, kn, losses.task_balancing_weights(y_all, ko, kn)), 0, k_new),
        "local_ce": (lambda a, ko, kn: losses.local_ce_loss(mask(a, 0, kn), y_cur, ko),
                     k_old, k_new),
        "kd": (lambda a, ko, kn: losses.kd_loss(mask(a, 0, ko), mask(t, 0, ko), temp),
               0, k_old),
        "padded_kd": (lambda a, ko, kn: losses.padded_soft_kd_loss(a, t, ko, kn, temp),
                      0, k_new),
        "lwf_mc": (lambda a, ko, kn: losses.lwf_mc_loss(a, y_all, t, num_old=ko, num_valid=kn),
                   0, k_new),
        "diversity": (lambda a, ko, kn: losses.diversity_loss(mask(a, 0, kn), num_valid=kn),
                      0, k_new),
        "content": (lambda a, ko, kn: losses.content_loss(mask(a * 1e3, 0, kn), 1e3),
                    0, k_new),
    }
    # K_old and K_new are traced, as in the training step (one compilation for every task)
    out = jax.jit(lambda a, ko, kn: {n: jax.value_and_grad(c[0])(a, ko, kn)
                                     for n, c in cases.items()})(z, k_old, k_new)
    # the formula of docs/algorithm.mds on the sliced columns, float64
    target = np.concatenate([_np_softmax(t_np[:, :k_old] / temp),
                             np.zeros((b, k_new - k_old))], axis=1)
    mc_target = np.eye(k_new)[np.asarray(y_all)]
    mc_target[:, :k_old] = _np_sigmoid(t_np[:, :k_old])
    zv = z_np[:, :k_new].astype(np.float64)
    p_bar = np.mean(_np_softmax(zv), axis=0)
    want = {
        "valid_ce": np.mean(w_np * _np_ce(zv, y_all)),
        "local_ce": np.mean(_np_ce(zv[:, k_old:], np.asarray(y_cur) - k_old)),
        "kd": _np_kd(zv[:, :k_old], t_np[:, :k_old], temp),
        "padded_kd": np.mean(-np.sum(target * _np_log_softmax(zv / temp), axis=1)),
        "lwf_mc": np.sum(_np_softplus(zv) - mc_target * zv) / b,
        "diversity": 1 + np.sum(p_bar * np.log(p_bar)) / np.log(k_new),
        "content": np.mean(_np_ce(zv, np.argmax(zv, axis=1))),
    }
    for name, (_, lo, hi) in cases.items():
        val, grad = out[name]
        _close(_scalar(val), want[name], rtol=2e-5, atol=2e-6)
        chex.assert_shape(grad, (b, k))
        chex.assert_tree_all_finite(grad)
        np.testing.assert_array_equal(grad[:, :lo], 0.0, err_msg=name)
        np.testing.assert_array_equal(grad[:, hi:], 0.0, err_msg=name)
        if hi - lo > 1:  # (a softmax over a single column is constant)
            assert np.abs(grad[:, lo:hi]).sum() > 0, name
    # the gradients' closed forms inside the range
    onehot = np.eye(k_new)[np.asarray(y_all)]
    _close(out["valid_ce"][1][:, :k_new], w_np[:, None] * (_np_softmax(zv) - onehot) / b,
           rtol=1e-4, atol=1e-6)
    _close(out["kd"][1][:, :k_old], (_np_softmax(zv[:, :k_old] / temp)
                                     - _np_softmax(t_np[:, :k_old] / temp)) / (temp * b),
           rtol=1e-4, atol=1e-6)
    _close(out["lwf_mc"][1][:, :k_new], (_np_sigmoid(zv) - mc_target) / b, rtol=1e-4,
           atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_head_losses_random_values_and_gradient_masks(seed):
    """FT-CE: only head columns [0, K_new) get gradient, features none. Feature KD: matches
    the formula for any full-width kernel; nothing reaches the teacher or the kernel."""
    rs, b, k, k_old, k_new, _, _ = _random_case(seed)
    d = rs.randint(1, 6)
    f_np, ft_np = rs.randn(b, d), rs.randn(b, d)
    kern_np, bias_np = rs.randn(d, k), rs.randn(k)
    other_np = kern_np.copy()
    other_np[:, k_old:] = rs.randn(d, k - k_old)  # differs from kern beyond K_old only
    y = jnp.asarray(rs.randint(0, k_new, b))
    w_np = rs.rand(b)
    w = jnp.asarray(w_np, jnp.float32)

    @jax.jit
    def run(f, ft, kern, bias, other, ko, kn):
        ft_ce = lambda f_, k_, b_: losses.head_finetune_ce(f_, k_, b_, y, w, kn)
        kd = lambda s_, t_, w_: losses.feature_kd_loss(s_, t_, w_, num_old=ko)
        return (jax.value_and_grad(ft_ce, argnums=(0, 1, 2))(f, kern, bias),
                jax.value_and_grad(kd, argnums=(0, 1, 2))(f, ft, kern), kd(f, ft, other))

    (val, (gf, gk, gb)), (kd_val, (gs, gt, gw)), kd_other = run(
        *_f32(f_np, ft_np, kern_np, bias_np, other_np), k_old, k_new)
    f64 = [np.asarray(a, np.float64) for a in _f32(f_np, ft_np, kern_np, bias_np)]
    logits = f64[0] @ f64[2] + f64[3]
    _close(_scalar(val), np.mean(w_np * _np_ce(logits[:, :k_new], y)), rtol=2e-5, atol=2e-6)
    chex.assert_shape([gk], (d, k))
    np.testing.assert_array_equal(gf, 0.0)
    np.testing.assert_array_equal(gk[:, k_new:], 0.0)
    np.testing.assert_array_equal(gb[k_new:], 0.0)
    assert np.abs(gb[:k_new]).sum() > 0

    proj = (f64[0] - f64[1]) @ f64[2][:, :k_old]
    _close(_scalar(kd_val), np.mean(np.sum(proj ** 2, axis=1)) / k_old, rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(gt, 0.0)
    np.testing.assert_array_equal(gw, 0.0)
    _close(gs, 2 * proj @ f64[2][:, :k_old].T / (b * k_old), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(kd_other, kd_val)  # kernel columns >= K_old are ignored


@pytest.mark.parametrize("seed", range(5))
def test_kd_is_minimal_at_the_teacher(seed):
    """KD(s, t) >= KD(t, t) = H(softmax(t/T)) (Gibbs), with zero gradient at s = t."""
    rs, b, k, _, _, _, t_np = _random_case(seed)
    temp = float(rs.choice([1.0, 2.0, 4.0]))
    noise = jnp.asarray(rs.randn(3, b, k) * 0.5, jnp.float32)

    @jax.jit
    def run(t):
        kd = lambda s: losses.kd_loss(s, t, temp)
        return (jax.value_and_grad(kd)(t), jax.vmap(kd)(t + noise), kd(t + 3.0))

    (at_t, grad), perturbed, shifted = run(jnp.asarray(t_np))
    p = _np_softmax(np.asarray(t_np, np.float64) / temp)
    _close(_scalar(at_t), np.mean(-np.sum(p * np.log(p), axis=1)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, 0.0, atol=1e-7)
    assert np.all(np.asarray(perturbed) > float(at_t))
    _close(shifted, float(at_t), rtol=1e-5, atol=1e-6)  # softmax is shift-invariant


@pytest.mark.parametrize("seed", range(3))
def test_bn_stat_kl_random_matches_formula(seed):
    """Random channels against the per-channel KL written out in float64."""
    rs = np.random.RandomState(seed)
    c = rs.randint(1, 9)
    mb, mr = rs.randn(c), rs.randn(c)
    vb, vr = rs.rand(c) + 0.1, rs.rand(c) + 0.1
    want = np.mean(0.5 * np.log(vb / vr) - 0.5 * (1 - (vr + (mr - mb) ** 2) / vb))
    _close(_scalar(jax.jit(losses.bn_stat_kl)(*_f32(mb, vb, mr, vr))), want, rtol=1e-5,
           atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_smoothness_random_matches_reflect_blur(seed):
    """mean((x - blur x)^2) against an explicit 5x5 loop over the reflect-padded image."""
    rs = np.random.RandomState(seed)
    n, h, w, c = rs.randint(1, 3), rs.randint(3, 7), rs.randint(3, 7), rs.randint(1, 4)
    x = rs.randn(n, h, w, c)
    k = np.outer(_hand_blur_1d(), _hand_blur_1d())
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    blurred = np.zeros_like(x)
    for di in range(5):
        for dj in range(5):
            blurred += k[di, dj] * padded[:, di:di + h, dj:dj + w, :]
    _close(_scalar(jax.jit(losses.smoothness_loss)(jnp.asarray(x, jnp.float32))),
           np.mean((x - blurred) ** 2), rtol=1e-5, atol=1e-6)


def test_losses_return_float32_for_bfloat16_inputs():
    """Mixed precision: the losses compute in float32 whatever the logits' dtype."""
    y = jnp.array([2, 3, 4])

    @jax.jit
    def all_losses(z):
        return (losses.valid_ce_loss(z, y, 5), losses.local_ce_loss(z, y, 2),
                losses.kd_loss(z, z + 1, 2.0), losses.padded_soft_kd_loss(z, z, 2, 5, 2.0),
                losses.lwf_mc_loss(z, y, z[:, :2]), losses.diversity_loss(z),
                losses.content_loss(z * 100, 100.0),
                losses.feature_kd_loss(z, z * 0, jnp.ones((5, 2))))

    z = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
    for val16, val32 in zip(all_losses(z.astype(jnp.bfloat16)), all_losses(z)):
        _close(_scalar(val16), _scalar(val32), rtol=3e-2, atol=1e-2)


# ================================ 3./4. ABD's Table-3 switches, method losses on tiny models

NUM_CLASSES, K_OLD, K_NEW, B, Z_DIM = 6, 2, 4, 4, 8


@pytest.fixture(scope="module")
def setup():
    """Student, teacher (another init), a tiny generator and a real batch of new classes."""
    net, gen = TinyNet(NUM_CLASSES), TinyGenerator()
    x = jax.random.normal(jax.random.PRNGKey(0), (B, 4, 4, 1))
    y = jnp.array([2, 3, 3, 2])
    student, teacher, gv = jax.jit(lambda: (
        net.init(jax.random.PRNGKey(1), x, train=False),
        net.init(jax.random.PRNGKey(2), x, train=False),
        gen.init(jax.random.PRNGKey(3), jnp.zeros((2, Z_DIM)), train=False)))()
    gen_state = train.TrainState.create(apply_fn=gen.apply, params=gv["params"],
                                        batch_stats=gv["batch_stats"], tx=optax.identity())
    state = ReplayState(teacher=FrozenModel(teacher["params"], teacher["batch_stats"]),
                        generator=gen_state)
    return dict(net=net, x=x, y=y, student=student, state=state, gen=gen)


def _ctx(s, params=None, inputs=None):
    params = s["student"]["params"] if params is None else params
    bs = s["student"]["batch_stats"]

    def forward(images):
        (logits, feats), upd = s["net"].apply({"params": params, "batch_stats": bs}, images,
                                              train=True, mutable=["batch_stats"])
        return logits, feats, upd["batch_stats"]

    return train.LossContext(forward=forward, model=s["net"], params=params, batch_stats=bs,
                             inputs=s["state"] if inputs is None else inputs,
                             images=s["x"], labels=s["y"], num_old=jnp.int32(K_OLD),
                             num_seen=jnp.int32(K_NEW), rng=jax.random.PRNGKey(4))


ABD_VARIANTS = {
    "on": {}, "task_balancing": dict(task_balancing=False), "local_ce": dict(local_ce=False),
    "kd_on_real": dict(kd_on_real=False), "kd_on_synthetic": dict(kd_on_synthetic=False),
    "no_kd": dict(kd_on_real=False, kd_on_synthetic=False), "ft_ce": dict(ft_ce=False),
    "mu": dict(mu=0.5),
}


@pytest.fixture(scope="module")
def runs(setup):
    """Every method loss on the same step (one jitted call), plus what the hand computations
    read back: the replayed batch, the student's (train mode) and the teacher's outputs."""
    s = setup
    teacher_state = TeacherState(teacher=s["state"].teacher)

    @jax.jit
    def run():
        ctx, real_ctx = _ctx(s), _ctx(s, inputs=teacher_state)
        rep = replay(ctx, s["gen"], Z_DIM)
        logits, feats, _ = ctx.forward(rep.images)
        drop_bs = lambda out: (out[0], out[2])
        return dict(
            images=rep.images, labels=rep.labels, z=logits, f=feats, tz=rep.teacher_logits,
            tf=rep.teacher_features, z_real=real_ctx.forward(s["x"])[0],
            tz_real=frozen_apply(s["net"], s["state"].teacher, s["x"])[0],
            abd={name: drop_bs(abd.abd_loss(ctx, s["gen"], Z_DIM, abd.AbdOptions(**sw)))
                 for name, sw in ABD_VARIANTS.items()},
            deepinversion={str(mu): drop_bs(deepinversion.deepinversion_loss(
                ctx, s["gen"], Z_DIM, mu, 2.0)) for mu in (1.0, 0.5)},
            lwf_synthetic=drop_bs(lwf.lwf_synthetic_loss(ctx, s["gen"], Z_DIM, 0.1, 2.0)),
            lwf=drop_bs(lwf.lwf_loss(real_ctx, 1.0, 2.0)),
            lwf_mc=drop_bs(lwf.lwf_mc_loss(real_ctx, with_teacher=True)),
            lwf_mc_first=drop_bs(lwf.lwf_mc_loss(real_ctx, with_teacher=False)))

    out = run()
    chex.assert_shape(out["images"], (2 * B, 4, 4, 1))
    chex.assert_shape([out["z"], out["tz"]], (2 * B, NUM_CLASSES))
    chex.assert_tree_all_finite(out)
    head = s["student"]["params"]["head"]
    r = {k: np.asarray(out[k], np.float64)
         for k in ("z", "f", "tz", "tf", "z_real", "tz_real")}
    r.update(W=np.asarray(head["kernel"], np.float64), b=np.asarray(head["bias"], np.float64),
             Wt=np.asarray(s["state"].teacher.params["head"]["kernel"], np.float64),
             y=np.asarray(out["labels"]), y_real=np.asarray(s["y"]))
    for key in ("abd", "deepinversion"):
        r[key] = {name: (_scalar(loss), {k: _scalar(v) for k, v in m.items()})
                  for name, (loss, m) in out[key].items()}
    for key in ("lwf_synthetic", "lwf", "lwf_mc", "lwf_mc_first"):
        loss, m = out[key]
        r[key] = (_scalar(loss), {k: _scalar(v) for k, v in m.items()})
    return r


def test_abd_moves_batchnorm_statistics_twice_as_the_release(setup):
    """The release computes FT-CE's features by a second no-grad forward of the same 2B
    images in train mode, so every BatchNorm's running statistics move twice per step:
    with `ft_second_bn_update` the step's statistics equal two train-mode forwards'; by
    default (one forward, as the paper's Eq. 14) and without FT-CE, one's."""
    s = setup

    @jax.jit
    def run():
        ctx = _ctx(s)
        images = replay(ctx, s["gen"], Z_DIM).images
        once = ctx.forward(images)[2]
        (_, _), twice = s["net"].apply({"params": s["student"]["params"], "batch_stats": once},
                                       images, train=True, mutable=["batch_stats"])
        stats = lambda **sw: abd.abd_loss(ctx, s["gen"], Z_DIM, abd.AbdOptions(**sw))[1]
        return (once, twice["batch_stats"], stats(ft_second_bn_update=True), stats(),
                stats(ft_ce=False, ft_second_bn_update=True))

    once, twice, release, default, no_ft = run()
    assert not np.allclose(jax.tree.leaves(once)[0], jax.tree.leaves(twice)[0])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 release, twice)
    jax.tree.map(np.testing.assert_array_equal, default, once)
    jax.tree.map(np.testing.assert_array_equal, no_ft, once)


def _hand_abd_terms(r, balance=True, local=True, kd_rows=slice(None)):
    """§5, written out: w, local CE (real) or valid CE (2B), FT-CE (2B), feature KD."""
    y = r["y"]
    ratio = K_OLD / K_NEW
    w = np.where(y < K_OLD, ratio, 1 - ratio) if balance else np.ones(len(y))
    if local:
        ce = np.mean(w[:B] * _np_ce(r["z"][:B, K_OLD:K_NEW], y[:B] - K_OLD))
    else:
        ce = np.mean(w * _np_ce(r["z"][:, :K_NEW], y))
    head_logits = r["f"] @ r["W"] + r["b"]
    ft = np.mean(w * _np_ce(head_logits[:, :K_NEW], y))
    proj = (r["f"][kd_rows] - r["tf"][kd_rows]) @ r["Wt"][:, :K_OLD]
    kd = np.mean(np.sum(proj ** 2, axis=1)) / K_OLD
    return ce, ft, kd


METHOD_TOL = dict(rtol=1e-5, atol=1e-6)  # float32 step against the float64 hand formula
SAME = dict(rtol=1e-6, atol=0)            # a term a switch must leave alone


def test_replayed_labels_are_the_teachers_old_class_argmax(runs):
    """§4: y_syn = argmax teacher(x_syn)[:, :K_old]; the real labels come first."""
    np.testing.assert_array_equal(runs["y"][:B], runs["y_real"])
    np.testing.assert_array_equal(runs["y"][B:], np.argmax(runs["tz"][B:, :K_OLD], axis=1))
    # both kinds of label occur, so the task-balancing weights take both values
    assert (runs["y"] < K_OLD).any() and (runs["y"] >= K_OLD).any()


def test_abd_loss_terms_match_hand_computation(runs):
    """§5: L = L_localCE + L_ftCE + mu L_kd, each term from the read-back outputs."""
    loss, m = runs["abd"]["on"]
    assert set(m) == {"ce", "ft_ce", "feature_kd"}
    ce, ft, kd = _hand_abd_terms(runs)
    _close(m["ce"], ce, **METHOD_TOL)
    _close(m["ft_ce"], ft, **METHOD_TOL)
    _close(m["feature_kd"], kd, **METHOD_TOL)
    _close(loss, ce + ft + 0.1 * kd, **METHOD_TOL)


@pytest.mark.parametrize("switch", [v for v in ABD_VARIANTS if v != "on"])
def test_each_table3_switch_changes_only_its_term(runs, switch):
    """Paper Table 3 / §5: each AbdOptions switch changes exactly the term it names."""
    r = runs
    on = r["abd"]["on"][1]
    loss, off = r["abd"][switch]
    mu = ABD_VARIANTS[switch].get("mu", 0.1)
    _close(loss, off["ce"] + off.get("ft_ce", 0.0) + mu * off.get("feature_kd", 0.0),
           rtol=1e-6, atol=1e-7)
    if switch == "task_balancing":  # w = 1: both weighted CEs change, KD does not
        ce, ft, _ = _hand_abd_terms(r, balance=False)
        _close(off["ce"], ce, **METHOD_TOL)
        _close(off["ft_ce"], ft, **METHOD_TOL)
        # the real labels are all new: every local-CE weight goes from 1 - r = 1/2 to 1
        _close(off["ce"], on["ce"] / (1 - K_OLD / K_NEW), rtol=1e-6)
        assert abs(off["ft_ce"] - on["ft_ce"]) > 1e-4
        _close(off["feature_kd"], on["feature_kd"], **SAME)
    elif switch == "local_ce":  # standard CE over the valid logits on all 2B samples
        _close(off["ce"], _hand_abd_terms(r, local=False)[0], **METHOD_TOL)
        assert abs(off["ce"] - on["ce"]) > 1e-4
        _close(off["ft_ce"], on["ft_ce"], **SAME)
        _close(off["feature_kd"], on["feature_kd"], **SAME)
    elif switch in ("kd_on_real", "kd_on_synthetic"):  # KD over the other half only
        rows = slice(B, None) if switch == "kd_on_real" else slice(0, B)
        _close(off["feature_kd"], _hand_abd_terms(r, kd_rows=rows)[2], **METHOD_TOL)
        assert abs(off["feature_kd"] - on["feature_kd"]) > 1e-6
        _close(off["ce"], on["ce"], **SAME)
        _close(off["ft_ce"], on["ft_ce"], **SAME)
        # the full-batch KD is the mean of the two (equal-size) halves
        halves = r["abd"]["kd_on_real"][1]["feature_kd"] + r["abd"]["kd_on_synthetic"][1][
            "feature_kd"]
        _close(on["feature_kd"], halves / 2, rtol=1e-5)
    elif switch == "no_kd":
        assert set(off) == {"ce", "ft_ce"}
        _close(off["ce"], on["ce"], **SAME)
        _close(off["ft_ce"], on["ft_ce"], **SAME)
    elif switch == "ft_ce":
        assert set(off) == {"ce", "feature_kd"}
        _close(off["ce"], on["ce"], **SAME)
        _close(off["feature_kd"], on["feature_kd"], **SAME)
    else:  # mu weighs the KD term only (the total was checked above with mu = 0.5)
        assert set(off) == set(on)
        for k in on:
            _close(off[k], on[k], **SAME)


def test_abd_gradient_masks_on_the_head(setup):
    """Local CE alone: head columns outside [K_old, K_new) get exactly zero gradient; with
    FT-CE the old columns are trained too, never the unseen ones; the teacher gets none."""
    s = setup
    state = s["state"]
    local_only = abd.AbdOptions(ft_ce=False, kd_on_real=False, kd_on_synthetic=False)

    def student_loss(params, opts):
        return abd.abd_loss(_ctx(s, params=params), s["gen"], Z_DIM, opts)[0]

    def teacher_loss(params):
        teacher = FrozenModel(params, state.teacher.batch_stats)
        ctx = _ctx(s, inputs=state.replace(teacher=teacher))
        return abd.abd_loss(ctx, s["gen"], Z_DIM, abd.AbdOptions())[0]

    g_local, g_full, g_teacher = jax.jit(lambda p, tp: (
        jax.grad(student_loss)(p, local_only), jax.grad(student_loss)(p, abd.AbdOptions()),
        jax.grad(teacher_loss)(tp)))(s["student"]["params"], state.teacher.params)
    chex.assert_trees_all_equal_shapes(g_local, s["student"]["params"])
    chex.assert_tree_all_finite((g_local, g_full, g_teacher))
    g = g_local["head"]
    np.testing.assert_array_equal(g["kernel"][:, :K_OLD], 0.0)
    np.testing.assert_array_equal(g["kernel"][:, K_NEW:], 0.0)
    np.testing.assert_array_equal(g["bias"][:K_OLD], 0.0)
    np.testing.assert_array_equal(g["bias"][K_NEW:], 0.0)
    assert np.abs(g["kernel"][:, K_OLD:K_NEW]).sum() > 0
    g = g_full["head"]
    np.testing.assert_array_equal(g["kernel"][:, K_NEW:], 0.0)
    np.testing.assert_array_equal(g["bias"][K_NEW:], 0.0)
    assert np.abs(g["kernel"][:, :K_OLD]).sum() > 0
    for leaf in jax.tree.leaves(g_teacher):
        np.testing.assert_array_equal(leaf, 0.0)


@pytest.mark.parametrize("mu", [1.0, 0.5])
def test_deepinversion_loss_matches_hand_computation(runs, mu):
    """§6: CE(real, [0, K_new)) + mu KD(real, [0, K_old)) + mu padded KD(synthetic)."""
    r, temp = runs, 2.0
    loss, m = r["deepinversion"][str(mu)]
    z, tz, y = r["z"], r["tz"], r["y"]
    ce = np.mean(_np_ce(z[:B, :K_NEW], y[:B]))
    kd_real = _np_kd(z[:B, :K_OLD], tz[:B, :K_OLD], temp)
    target = np.concatenate([_np_softmax(tz[B:, :K_OLD] / temp),
                             np.zeros((B, K_NEW - K_OLD))], axis=1)
    kd_syn = np.mean(-np.sum(target * _np_log_softmax(z[B:, :K_NEW] / temp), axis=1))
    _close(m["ce"], ce, **METHOD_TOL)
    _close(m["kd_real"], kd_real, **METHOD_TOL)
    _close(m["kd_synthetic"], kd_syn, **METHOD_TOL)
    _close(loss, ce + mu * (kd_real + kd_syn), **METHOD_TOL)


def test_lwf_synthetic_loss_matches_hand_computation(runs):
    """§6: CE on real over [0, K_new) + mu KD(z[:, :K_old], teacher) over all 2B, mu 0.1."""
    r = runs
    loss, m = r["lwf_synthetic"]
    ce = np.mean(_np_ce(r["z"][:B, :K_NEW], r["y"][:B]))
    kd = _np_kd(r["z"][:, :K_OLD], r["tz"][:, :K_OLD], 2.0)
    _close(m["ce"], ce, **METHOD_TOL)
    _close(m["kd"], kd, **METHOD_TOL)
    _close(loss, ce + 0.1 * kd, **METHOD_TOL)


def test_lwf_loss_matches_hand_computation(runs):
    """§6: CE(z[:, :K_new], y) + mu KD(z[:, :K_old], teacher(x)[:, :K_old]), mu = 1."""
    z, tz, y = runs["z_real"], runs["tz_real"], runs["y_real"]
    loss, m = runs["lwf"]
    ce, kd = np.mean(_np_ce(z[:, :K_NEW], y)), _np_kd(z[:, :K_OLD], tz[:, :K_OLD], 2.0)
    _close(m["ce"], ce, **METHOD_TOL)
    _close(m["kd"], kd, **METHOD_TOL)
    _close(loss, ce + kd, **METHOD_TOL)


def test_lwf_mc_method_loss_matches_hand_computation(runs):
    """§6: sum of BCE(sigmoid(z[:, :K_new]), [sigmoid(t[:, :K_old]), onehot]) / B."""
    z, tz, y = runs["z_real"], runs["tz_real"], runs["y_real"]
    target = np.eye(K_NEW)[y]
    target[:, :K_OLD] = _np_sigmoid(tz[:, :K_OLD])
    want = np.sum(_np_softplus(z[:, :K_NEW]) - target * z[:, :K_NEW]) / B
    loss, m = runs["lwf_mc"]
    _close(loss, want, **METHOD_TOL)
    _close(m["bce"], want, **METHOD_TOL)
    # task 1 (no teacher): one-hot targets on every valid column
    onehot = np.eye(K_NEW)[y]
    _close(runs["lwf_mc_first"][0],
           np.sum(_np_softplus(z[:, :K_NEW]) - onehot * z[:, :K_NEW]) / B, **METHOD_TOL)
