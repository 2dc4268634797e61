"""DeepInversion for class-incremental learning (SPEC section 6): ABD's synthesis, logit KD."""
from __future__ import annotations

import jax
import flax.linen as nn

from abd_jax import losses, synthesis
from abd_jax.train import LossContext


def deepinversion(ctx: LossContext, generator: nn.Module, z_dim: int, mu: float,
                  temperature: float):
    """CE(real, valid) + mu * KD(real, [0, K_old)) + mu * soft-KD(synthetic) where the target
    is [softmax(teacher_syn[:, :K_old] / T), 0 ... 0] against log_softmax(z_syn[:, :K_new]/T)."""
    replay = synthesis.replay_batch(ctx, generator, z_dim)
    b = replay.num_real
    logits, _, new_bs = ctx.forward(replay.images)
    real, syn = logits[:b], logits[b:]
    teacher_old = losses.mask_logits(replay.teacher_logits, 0, ctx.num_old)
    ce = losses.weighted_ce_loss(losses.mask_logits(real, 0, ctx.num_seen), replay.labels[:b])
    kd_real = losses.kd_loss(losses.mask_logits(real, 0, ctx.num_old), teacher_old[:b],
                             temperature)
    target = jax.nn.softmax(teacher_old[b:] / temperature, axis=-1)  # zero beyond K_old
    kd_syn = losses.soft_kd_loss(losses.mask_logits(syn, 0, ctx.num_seen), target, temperature)
    loss = ce + mu * (kd_real + kd_syn)
    return loss, new_bs, {"ce": ce, "kd_real": kd_real, "kd_synthetic": kd_syn}
