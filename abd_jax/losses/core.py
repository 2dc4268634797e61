"""The shared terms: logit masks, cross-entropies, knowledge distillation, ABD's task
balancing, FT-CE and importance-weighted feature KD (docs/algorithm.md §4-6)."""
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


__all__ = ["NEG_INF", "column_mask", "mask_logits", "weighted_ce_loss", "valid_ce_loss", "head_finetune_ce", "local_ce_loss", "task_balancing_weights", "soft_kd_loss", "kd_loss", "padded_soft_kd_loss", "feature_kd_loss"]
