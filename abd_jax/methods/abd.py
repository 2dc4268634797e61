"""ABD's learner loss (SPEC section 5) with the paper's Table 3 ablations as switches."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from abd_jax import losses, synthesis
from abd_jax.train import LossContext


@dataclasses.dataclass(frozen=True)
class AbdOptions:
    """mu: feature-KD weight. The switches turn off one ingredient each (Table 3)."""

    mu: float = 0.1
    task_balancing: bool = True   # False: w = 1
    local_ce: bool = True         # False: standard CE over valid logits on real + synthetic
    kd_on_real: bool = True       # feature KD over the real half
    kd_on_synthetic: bool = True  # feature KD over the synthetic half
    ft_ce: bool = True            # head-only fine-tuning CE


def head_finetune_loss(params, features, labels, weights, num_seen) -> jax.Array:
    """FT-CE: mean_i w_i CE(W sg(f_i) + b over [0, K_new), y_i); only the head (`params["head"]`
    kernel and bias) gets gradients. features `[n, D]`."""
    head = params["head"]
    logits = jax.lax.stop_gradient(features) @ head["kernel"] + head["bias"]
    return losses.weighted_ce_loss(losses.mask_logits(logits, 0, num_seen), labels, weights)


def abd(ctx: LossContext, generator: nn.Module, z_dim: int, opts: AbdOptions):
    """L = L_localCE + L_ftCE + mu * L_kd over x = [x_real; x_syn] (one student forward, BN
    statistics over the 2B images)."""
    replay = synthesis.replay_batch(ctx, generator, z_dim)
    b = replay.num_real
    logits, features, new_bs = ctx.forward(replay.images)
    valid = losses.mask_logits(logits, 0, ctx.num_seen)
    y = replay.labels
    if opts.task_balancing:
        w = losses.task_balancing_weights(y, ctx.num_old, ctx.num_seen)
    else:
        w = jnp.ones(y.shape, jnp.float32)

    if opts.local_ce:
        ce = losses.local_ce_loss(valid[:b], y[:b], ctx.num_old, w[:b])
    else:
        ce = losses.weighted_ce_loss(valid, y, w)
    metrics = {"ce": ce}
    loss = ce

    if opts.ft_ce:
        ft = head_finetune_loss(ctx.params, features, y, w, ctx.num_seen)
        metrics["ft_ce"] = ft
        loss = loss + ft

    rows = slice(0 if opts.kd_on_real else b, None if opts.kd_on_synthetic else b)
    if rows.start != rows.stop:
        kd = losses.feature_kd_loss(features[rows], replay.teacher_features[rows],
                                    ctx.frozen.teacher.params["head"]["kernel"],
                                    num_old=ctx.num_old)
        metrics["feature_kd"] = kd
        loss = loss + opts.mu * kd
    return loss, new_bs, metrics
