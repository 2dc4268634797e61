"""The baselines' own terms (docs/algorithm.md §6, §6b): E2E's per-task KD and balanced stage,
BiC's correction and stages, DGR's solver and autoencoder, LwF.MC."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from abd_jax.losses.core import kd_loss, mask_logits, task_balancing_weights, valid_ce_loss


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


__all__ = ["taskwise_kd_loss", "e2e_task_weights", "e2e_loss", "e2e_balanced_loss", "e2e_new_class_targets", "bias_correction", "bic_stage1_loss", "bic_stage2_loss", "dgr_solver_loss", "lwf_mc_loss", "vae_loss"]
