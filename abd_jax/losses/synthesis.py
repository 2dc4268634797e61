"""Model inversion's terms (docs/algorithm.md §3): BatchNorm statistics alignment, smoothness,
diversity and content."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from abd_jax.losses.core import weighted_ce_loss


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


__all__ = ["bn_stat_kl", "bn_alignment_loss", "smoothness_loss", "diversity_loss", "content_loss"]
