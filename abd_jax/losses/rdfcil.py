"""R-DFCIL's terms (docs/algorithm.md §9): its task weights, hard KD, relational KD by angles
and class-balanced CE."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from abd_jax.losses.core import _per_sample_ce, column_mask


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


__all__ = ["rdfcil_weights", "logit_l1_loss", "rkd_angle_loss", "class_balance_weights", "class_weighted_ce_loss"]
