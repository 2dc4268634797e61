"""Every loss of docs/algorithm.md, once, as pure jnp functions (no Flax, no state, no data).

Conventions: `B` batch, `K` logit columns. Each function returns a 0-d array, the mean over
the batch unless stated. Functions that take "already sliced" logits (e.g. `[B, K_new]`) also
accept full-width logits whose invalid columns were pushed to `NEG_INF` by `mask_logits`
(the softmax-based losses are then identical); where a loss is not softmax-based, an optional
keyword gives the column count instead, so one compiled step serves every task.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e9  # finite, so 0 * log_softmax stays 0 (a true -inf would give NaN)


def column_mask(num_columns: int, lo, hi) -> jax.Array:
    """Boolean `[num_columns]`, True for columns in `[lo, hi)` (lo, hi may be traced)."""
    cols = jnp.arange(num_columns)
    return (cols >= lo) & (cols < hi)


def mask_logits(logits: jax.Array, lo, hi) -> jax.Array:
    """`[B, K]` logits with every column outside `[lo, hi)` set to `NEG_INF`."""
    return jnp.where(column_mask(logits.shape[-1], lo, hi), logits, NEG_INF)


def _per_sample_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """`[B]`: -log softmax(logits)_label."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def weighted_ce_loss(logits: jax.Array, labels: jax.Array, weights=None) -> jax.Array:
    """mean_i w_i * CE(logits_i, y_i); logits `[B, K]`, labels `[B]`, weights `[B]` or None."""
    ce = _per_sample_ce(logits, labels)
    return jnp.mean(ce if weights is None else ce * weights)


def valid_ce_loss(logits: jax.Array, labels: jax.Array, num_seen, weights=None) -> jax.Array:
    """CE over the valid logits `[0, K_new)`: Base, Upper bound and every method's task 1
    (weights `[B]` or None)."""
    return weighted_ce_loss(mask_logits(logits, 0, num_seen), labels, weights)


def head_finetune_ce(features: jax.Array, kernel: jax.Array, bias: jax.Array,
                     labels: jax.Array, weights, num_seen) -> jax.Array:
    """ABD's FT-CE: mean_i w_i CE(W sg(f_i) + b over `[0, K_new)`, y_i).

    features `[B, D]`, kernel `[D, K]`, bias `[K]`: with the features stopped, only the head
    (kernel, bias) gets gradients."""
    logits = jax.lax.stop_gradient(features) @ kernel + bias
    return valid_ce_loss(logits, labels, num_seen, weights)


def local_ce_loss(logits: jax.Array, labels: jax.Array, num_old, weights=None) -> jax.Array:
    """ABD's local CE: mean_i w_i * CE(z_i[K_old:], y_i - K_old) over `[B, K_new]` logits.

    Columns `[0, num_old)` are masked out, so the old-class head rows get exactly zero gradient.
    """
    return weighted_ce_loss(mask_logits(logits, num_old, logits.shape[-1]), labels, weights)


def task_balancing_weights(labels: jax.Array, num_old, num_new) -> jax.Array:
    """`[B]`: r = K_old / K_new for past-class labels (y < K_old), 1 - r for new classes."""
    r = jnp.asarray(num_old, jnp.float32) / jnp.asarray(num_new, jnp.float32)
    return jnp.where(labels < num_old, r, 1.0 - r)


def soft_kd_loss(student_logits: jax.Array, target_probs: jax.Array, temperature) -> jax.Array:
    """mean_i -sum_k p_ik log_softmax(s_i / T)_k; student `[B, K]`, targets `[B, K]`."""
    log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.mean(-jnp.sum(target_probs * log_probs, axis=-1))


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature) -> jax.Array:
    """KD(s, t, T) = mean_i -sum_k softmax(t_i/T)_k log_softmax(s_i/T)_k (no T^2 factor).

    Both `[B, K]` over the same columns (callers slice or mask). No gradient reaches the teacher.
    """
    target = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
                            / temperature, axis=-1)
    return soft_kd_loss(student_logits, target, temperature)


def taskwise_kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, num_old,
                     bounds: tuple, temperature, task_weights=None) -> jax.Array:
    """E2E's distillation: sum over the past tasks j (`bounds[j] = (lo, hi)` inside
    `[0, K_old)`) of w_j KD(s[:, lo:hi], t[:, lo:hi], T). Full-width `[B, K]` logits;
    `task_weights` `[N]` (`e2e_task_weights`) or None (1 each)."""
    total = jnp.zeros((), jnp.float32)
    for j, (lo, hi) in enumerate(bounds):
        term = kd_loss(mask_logits(student_logits, lo, hi), mask_logits(teacher_logits, lo, hi),
                       temperature)
        weight = 1.0 if task_weights is None else task_weights[j]
        total = total + jnp.where(hi <= num_old, weight * term, 0.0)
    return total


def e2e_task_weights(weighting: str, bounds: tuple, num_classes) -> jax.Array:
    """`[N]` weights of the tasks' KD terms in E2E: |task j| / `num_classes` ("mean", the
    release's: K_old while training a task, K_new in the balanced stage) or 1 ("sum", the
    paper's)."""
    if weighting not in ("mean", "sum"):
        raise ValueError(f"E2E kd_weighting {weighting!r}: use 'mean' or 'sum'")
    sizes = jnp.asarray([hi - lo for lo, hi in bounds], jnp.float32)
    if weighting == "sum":
        return jnp.ones_like(sizes)
    return sizes / jnp.asarray(num_classes, jnp.float32)


def e2e_loss(logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, num_old,
             num_seen, bounds: tuple, temperature, weighting: str):
    """E2E while learning a task: CE over `[0, K_new)` + sum_j w_j KD_j over the past tasks,
    w = `e2e_task_weights(weighting, bounds, K_old)`. Full-width logits. Returns (loss, ce,
    kd)."""
    ce = valid_ce_loss(logits, labels, num_seen)
    kd = taskwise_kd_loss(logits, teacher_logits, num_old, bounds, temperature,
                          e2e_task_weights(weighting, bounds, num_old))
    return ce + kd, ce, kd


def e2e_balanced_loss(logits: jax.Array, teacher_logits: jax.Array, new_class_targets: jax.Array,
                      labels: jax.Array, num_old, num_seen, bounds: tuple, temperature,
                      weighting: str):
    """E2E's balanced fine-tuning: CE over `[0, K_new)` + sum_{j < t} w_j KD_j(teacher) +
    w_t KD of the new classes' logits `[K_old, K_new)` against `new_class_targets`' columns
    `[K_old, K_new)` (`e2e_new_class_targets`); "mean": w_j = |task j| / K_new, w_t =
    (K_new - K_old) / K_new; "sum": 1. Returns (loss, ce, kd_old, kd_new)."""
    ce = valid_ce_loss(logits, labels, num_seen)
    kd_old = taskwise_kd_loss(logits, teacher_logits, num_old, bounds, temperature,
                              e2e_task_weights(weighting, bounds, num_seen))
    new = jnp.asarray(num_seen - num_old, jnp.float32)
    w_new = 1.0 if weighting == "sum" else new / jnp.asarray(num_seen, jnp.float32)
    kd_new = w_new * kd_loss(mask_logits(logits, num_old, num_seen),
                             mask_logits(new_class_targets, num_old, num_seen), temperature)
    return ce + kd_old + kd_new, ce, kd_old, kd_new


def e2e_new_class_targets(teacher_logits: jax.Array, before_logits: jax.Array, num_old,
                          source: str) -> jax.Array:
    """`[B, K]` logits whose columns `[K_old, K_new)` are the balanced stage's KD targets for
    the new classes: "release", the previous task's model's first columns `[0, K_new - K_old)`
    (the target the release's `ETE.update_model_b` reads: its `target_KD`, not the
    `target_KD_B` it computes); "before", the model as it was before the stage (the E2E
    paper)."""
    if source == "release":
        return jnp.roll(teacher_logits, num_old, axis=-1)
    if source == "before":
        return before_logits
    raise ValueError(f"E2E new-class KD target {source!r}: use 'release' or 'before'")


def bias_correction(logits: jax.Array, alpha: jax.Array, beta: jax.Array, bounds: tuple,
                    num_corrected) -> jax.Array:
    """BiC: logit k of task j (`bounds[j] = (lo, hi)` holds k) becomes alpha_j z_k + beta_j
    for the columns `[0, num_corrected)`; the others are unchanged. logits `[B, K]`,
    alpha/beta `[N]`."""
    cols = jnp.arange(logits.shape[-1])
    starts = jnp.asarray([lo for lo, _ in bounds])
    task_of = jnp.clip(jnp.searchsorted(starts, cols, side="right") - 1, 0, alpha.shape[0] - 1)
    corrected = alpha[task_of] * logits + beta[task_of]
    return jnp.where(cols < num_corrected, corrected, logits)


def bic_stage1_loss(logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, num_old,
                    num_seen, temperature):
    """BiC's first stage: (1 - lambda) CE over `[0, K_new)` + lambda KD over `[0, K_old)`,
    lambda = K_old / K_new. Returns (loss, ce, kd)."""
    lam = jnp.asarray(num_old, jnp.float32) / jnp.asarray(num_seen, jnp.float32)
    ce = valid_ce_loss(logits, labels, num_seen)
    kd = kd_loss(mask_logits(logits, 0, num_old), mask_logits(teacher_logits, 0, num_old),
                 temperature)
    return (1.0 - lam) * ce + lam * kd, ce, kd


def bic_stage2_loss(logits: jax.Array, labels: jax.Array, alpha: jax.Array, beta: jax.Array,
                    bounds: tuple, num_seen) -> jax.Array:
    """BiC's second stage: CE over `[0, K_new)` of the frozen model's logits after every task's
    correction (`bias_correction` over `[0, K_new)`); only the new task's (alpha, beta) train."""
    return valid_ce_loss(bias_correction(logits, alpha, beta, bounds, num_seen),
                         labels, num_seen)


def dgr_solver_loss(logits: jax.Array, replay_teacher_logits: jax.Array, labels: jax.Array,
                    num_old, num_seen, mu, temperature):
    """DGR's solver on `[x_real; x_replay]` (logits `[B + R, K]`, labels `[B + R]`, the R
    replayed rows last): mean_i w_i CE over `[0, K_new)` with the task-balancing weights w
    (r = K_old / K_new for past-class labels, 1 - r for new ones) + mu KD over `[0, K_old)`
    of the replayed rows against the previous solver's logits `[R, K]`.
    Returns (loss, ce, kd)."""
    weights = task_balancing_weights(labels, num_old, num_seen)
    ce = valid_ce_loss(logits, labels, num_seen, weights)
    replayed = logits[logits.shape[0] - replay_teacher_logits.shape[0]:]
    kd = kd_loss(mask_logits(replayed, 0, num_old),
                 mask_logits(replay_teacher_logits, 0, num_old), temperature)
    return ce + mu * kd, ce, kd


def lwf_mc_loss(logits: jax.Array, labels: jax.Array, teacher_logits=None, *,
                num_old=None, num_valid=None) -> jax.Array:
    """LwF.MC (iCaRL without exemplars): sum over valid columns of BCE(sigmoid(z), target) / B.

    target = one_hot(y) over `[0, K_new)` with columns `[0, K_old)` replaced by
    sigmoid(teacher logits). Sliced form: logits `[B, K_new]`, teacher `[B, K_old]`. Masked
    form: both full width with `num_old` / `num_valid` given. Without a teacher (task 1,
    K_old = 0) the targets are the one-hot labels.
    """
    batch, width = logits.shape
    num_valid = width if num_valid is None else num_valid
    teacher = jnp.zeros((batch, width), jnp.float32)
    if teacher_logits is None:
        num_old = 0
    else:
        num_old = teacher_logits.shape[-1] if num_old is None else num_old
        teacher = teacher.at[:, :teacher_logits.shape[-1]].set(
            jax.lax.stop_gradient(teacher_logits).astype(jnp.float32))
    cols = jnp.arange(width)
    target = jnp.where(cols < num_old, jax.nn.sigmoid(teacher),
                       jax.nn.one_hot(labels, width, dtype=jnp.float32))
    z = logits.astype(jnp.float32)
    # BCE(sigmoid(z), t) = softplus(z) - t * z, numerically stable.
    bce = jax.nn.softplus(z) - target * z
    return jnp.sum(jnp.where(cols < num_valid, bce, 0.0)) / batch


def padded_soft_kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, num_old,
                        num_seen, temperature) -> jax.Array:
    """DeepInversion's synthetic-data KD: target `[softmax(t[:, :K_old] / T), 0 ... 0]` (zeros
    over `[K_old, K_new)`) against log_softmax(s[:, :K_new] / T). Full-width `[B, K]` logits."""
    teacher_old = mask_logits(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), 0,
                              num_old)
    target = jax.nn.softmax(teacher_old / temperature, axis=-1)  # zero beyond K_old
    return soft_kd_loss(mask_logits(student_logits, 0, num_seen), target, temperature)


def feature_kd_loss(student_features: jax.Array, teacher_features: jax.Array,
                    head_kernel: jax.Array, *, num_old=None) -> jax.Array:
    """ABD's importance-weighted feature KD: mean_i sum_k ((f_s - f_t) @ W)_ik^2 / K_old.

    Features `[B, D]`; `head_kernel` `[D, K_old]` (a Dense kernel sliced to the old classes),
    or full width with `num_old` given (other columns are ignored). No gradient reaches the
    teacher features or the kernel.
    """
    kernel = jax.lax.stop_gradient(head_kernel).astype(jnp.float32)
    num_old = kernel.shape[-1] if num_old is None else num_old
    kernel = jnp.where(jnp.arange(kernel.shape[-1]) < num_old, kernel, 0.0)
    diff = student_features.astype(jnp.float32) - jax.lax.stop_gradient(teacher_features)
    proj = diff @ kernel
    return jnp.mean(jnp.sum(jnp.square(proj), axis=-1)) / num_old


def vae_loss(recon: jax.Array, images: jax.Array, mean: jax.Array, logvar: jax.Array,
             weights=None, rows=None):
    """DGR's autoencoder loss as the release computes it, over the rows with `rows` = 1 (all
    when None): mean_i w_i BCE_i + mean_i KL_i, BCE_i = BCE(recon_i, x_i) averaged over the
    pixels, KL_i = KL(q(z|x_i) || N(0, I)) divided by the pixel count; the weights `[B]`
    scale the reconstruction term only. Images `[B, ...]` in [0, 1], mean/logvar `[B, z]`.
    Returns (loss, reconstruction, kl)."""
    batch = images.shape[0]
    p = jnp.clip(recon.reshape(batch, -1).astype(jnp.float32), 1e-7, 1.0 - 1e-7)
    x = images.reshape(batch, -1).astype(jnp.float32)
    bce = -jnp.mean(x * jnp.log(p) + (1.0 - x) * jnp.log(1.0 - p), axis=-1)
    kl = -0.5 * jnp.sum(1.0 + logvar - jnp.square(mean) - jnp.exp(logvar), axis=-1) / x.shape[1]
    w = jnp.ones((batch,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    rows = jnp.ones((batch,), jnp.float32) if rows is None else rows.astype(jnp.float32)
    count = jnp.sum(rows)
    reconstruction = jnp.sum(rows * w * bce) / count
    divergence = jnp.sum(rows * kl) / count
    return reconstruction + divergence, reconstruction, divergence


# ----------------------------------------------------------------------------- R-DFCIL


def rdfcil_weights(lambda_ce, lambda_hkd, lambda_rkd, num_old, num_seen):
    """R-DFCIL's weights of (local CE, HKD, RKD) while learning a task after the first:
    (lambda_ce (1 + 1 / alpha) / beta, lambda_hkd alpha beta, lambda_rkd alpha beta),
    alpha = log2(s / 2 + 1), beta = sqrt(K_old / s), s = K_new - K_old the task's classes."""
    s = jnp.asarray(num_seen - num_old, jnp.float32)
    alpha = jnp.log2(s / 2.0 + 1.0)
    beta = jnp.sqrt(jnp.asarray(num_old, jnp.float32) / s)
    return lambda_ce * (1.0 + 1.0 / alpha) / beta, lambda_hkd * alpha * beta, \
        lambda_rkd * alpha * beta


def logit_l1_loss(student_logits: jax.Array, teacher_logits: jax.Array, num_old) -> jax.Array:
    """R-DFCIL's hard KD (HKD): mean |z_s - z_t| over the `B x K_old` entries of columns
    `[0, K_old)`. Full-width `[B, K]` logits; no gradient reaches the teacher."""
    batch, width = student_logits.shape
    diff = jnp.abs(student_logits.astype(jnp.float32)
                   - jax.lax.stop_gradient(teacher_logits).astype(jnp.float32))
    total = jnp.sum(jnp.where(column_mask(width, 0, num_old), diff, 0.0))
    return total / (batch * jnp.asarray(num_old, jnp.float32))


def _angles(embeddings: jax.Array) -> jax.Array:
    """`[N, N, N]`: angle[a, b, c] = <e(a, b), e(a, c)>, e(a, b) = (x_b - x_a) /
    ||x_b - x_a||, and e(a, b) = 0 with a zero gradient where x_b = x_a (b = a, or two equal
    rows). Embeddings `[N, D]`.

    The release divides by the norm clamped at eps (F.normalize), a slope of 1 / eps at a
    zero vector, which its L1 multiplies by sign(0) = 0 where both sides have the zero
    vector (their angles are both 0): its gradient is finite and float32 keeps it. `jnp.abs`
    has slope 1 at 0, so a clamped division here would send +-1 / eps into x_a's gradient;
    the zero gradient gives the release's instead (where only one side has two equal rows,
    the release's is of order 1 / eps)."""
    x = embeddings.astype(jnp.float32)
    diff = x[None, :, :] - x[:, None, :]
    square = jnp.sum(jnp.square(diff), axis=-1, keepdims=True)
    apart = square > 0
    unit = jnp.where(apart, diff / jnp.sqrt(jnp.where(apart, square, 1.0)), 0.0)
    return jnp.einsum("abd,acd->abc", unit, unit)


def rkd_angle_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """Relational KD by angles (R-DFCIL's RKD): mean over the N^3 triplets of
    |angle_s(a, b, c) - angle_t(a, b, c)| (see `_angles`) of the embeddings `[N, D]`.
    Gradients reach both (R-DFCIL learns a projection of each)."""
    return jnp.mean(jnp.abs(_angles(student) - _angles(teacher)))


def class_balance_weights(counts: jax.Array, num_seen) -> jax.Array:
    """`[K]`: w_k = n / max(n_k, 1) with n = sum_k n_k the labels counted, divided by its
    minimum over the seen classes `[0, K_new)` (so the most frequent class weighs 1); 1 for
    the columns beyond. counts `[K]`."""
    counts = counts.astype(jnp.float32)
    seen = column_mask(counts.shape[-1], 0, num_seen)
    w = jnp.sum(jnp.where(seen, counts, 0.0)) / jnp.maximum(counts, 1.0)
    return jnp.where(seen, w / jnp.min(jnp.where(seen, w, jnp.inf)), 1.0)


def class_weighted_ce_loss(logits: jax.Array, labels: jax.Array,
                           class_weights: jax.Array) -> jax.Array:
    """sum_i w_{y_i} CE(z_i, y_i) / sum_i w_{y_i} (PyTorch's cross-entropy with class
    weights); logits `[B, K]`, labels `[B]`, class_weights `[K]`."""
    w = class_weights[labels].astype(jnp.float32)
    return jnp.sum(w * _per_sample_ce(logits, labels)) / jnp.sum(w)


# ----------------------------------------------------------------------------- synthesis


def bn_stat_kl(batch_mean, batch_var, running_mean, running_var) -> jax.Array:
    """Channel-mean of KL(N(mu_run, var_run) || N(mu_b, var_b)) for one BN layer, inputs `[C]`.

    KL = log(sd_b / sd_run) - 0.5 * (1 - (var_run + (mu_run - mu_b)^2) / var_b),
    with 1e-8 added to both variances.
    """
    var_b = batch_var + 1e-8
    var_r = running_var + 1e-8
    kl = 0.5 * (jnp.log(var_b) - jnp.log(var_r)) - 0.5 * (
        1.0 - (var_r + jnp.square(running_mean - batch_mean)) / var_b)
    return jnp.mean(kl)


def bn_alignment_loss(layer_stats) -> jax.Array:
    """L_stat = (1/L) sum_l bn_stat_kl(...) over the L BatchNorm layers; `layer_stats` is a
    sequence of (batch_mean, batch_var, running_mean, running_var), each `[C_l]`."""
    if not layer_stats:
        raise ValueError("bn_alignment_loss needs at least one BatchNorm layer's statistics")
    return jnp.mean(jnp.stack([bn_stat_kl(*stats) for stats in layer_stats]))


def _blur_kernel(sigma: float = 1.0) -> jax.Array:
    """5x5 kernel of the release: exp(-((i - 2) / (2 sigma))^2) per axis, normalised to 1."""
    i = jnp.arange(5, dtype=jnp.float32)
    g = jnp.exp(-jnp.square((i - 2.0) / (2.0 * sigma)))
    k = jnp.outer(g, g)
    return k / jnp.sum(k)


def smoothness_loss(images: jax.Array) -> jax.Array:
    """mean((x - blur(x))^2), images `[N, H, W, C]`; depthwise 5x5 blur on reflect-padded x."""
    x = images.astype(jnp.float32)
    channels = x.shape[-1]
    padded = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    kernel = jnp.tile(_blur_kernel()[:, :, None, None], (1, 1, 1, channels))
    blurred = jax.lax.conv_general_dilated(
        padded, kernel, window_strides=(1, 1), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)
    return jnp.mean(jnp.square(x - blurred))


def diversity_loss(logits: jax.Array, *, num_valid=None) -> jax.Array:
    """1 + sum_k p_bar_k log p_bar_k / log K, p_bar = batch-mean softmax of `[B, K]` logits.

    0 when the mean prediction is uniform, 1 when every sample predicts the same class. With
    full-width masked logits pass `num_valid` (= K).
    """
    k = logits.shape[-1] if num_valid is None else num_valid
    p_bar = jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=0)
    neg_entropy = jnp.sum(jnp.where(p_bar > 0, p_bar * jnp.log(jnp.maximum(p_bar, 1e-30)), 0.0))
    return 1.0 + neg_entropy / jnp.log(jnp.asarray(k, jnp.float32))


def content_loss(logits: jax.Array, temperature) -> jax.Array:
    """CE(logits / T, argmax logits), logits `[B, K]` (T = 1e3 in ABD)."""
    labels = jnp.argmax(logits, axis=-1)
    return weighted_ce_loss(logits / temperature, jax.lax.stop_gradient(labels))


__all__ = [
    "NEG_INF", "column_mask", "mask_logits", "weighted_ce_loss", "valid_ce_loss",
    "head_finetune_ce", "local_ce_loss", "task_balancing_weights", "soft_kd_loss", "kd_loss",
    "taskwise_kd_loss", "e2e_task_weights", "e2e_loss", "e2e_balanced_loss",
    "e2e_new_class_targets",
    "bias_correction", "bic_stage1_loss", "bic_stage2_loss", "dgr_solver_loss", "lwf_mc_loss",
    "padded_soft_kd_loss", "vae_loss", "feature_kd_loss", "rdfcil_weights", "logit_l1_loss",
    "rkd_angle_loss", "class_balance_weights", "class_weighted_ce_loss", "bn_stat_kl",
    "bn_alignment_loss", "smoothness_loss", "diversity_loss", "content_loss",
]
