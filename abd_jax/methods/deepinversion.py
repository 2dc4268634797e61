"""DeepInversion for class-incremental learning (docs/algorithm.md §6): ABD's synthesis, logit
KD."""
from __future__ import annotations

import flax.linen as nn

from abd_jax import losses
from abd_jax.methods.base import ce
from abd_jax.methods.synthetic_replay import SyntheticReplay, replay
from abd_jax.methods.published import abd_table
from abd_jax.session import bind
from abd_jax.train import LossContext


def deepinversion_loss(ctx: LossContext, generator: nn.Module, z_dim: int, mu: float,
                       temperature: float):
    """CE(real, valid) + mu * KD(real, [0, K_old)) + mu * padded soft-KD(synthetic)."""
    rep = replay(ctx, generator, z_dim)
    b = rep.num_real
    logits, _, new_bs = ctx.forward(rep.images)
    real, syn = logits[:b], logits[b:]
    ce = losses.valid_ce_loss(real, rep.labels[:b], ctx.num_seen)
    kd_real = losses.kd_loss(losses.mask_logits(real, 0, ctx.num_old),
                             losses.mask_logits(rep.teacher_logits[:b], 0, ctx.num_old),
                             temperature)
    kd_syn = losses.padded_soft_kd_loss(syn, rep.teacher_logits[b:], ctx.num_old,
                                        ctx.num_seen, temperature)
    loss = ce + mu * (kd_real + kd_syn)
    return loss, new_bs, {"ce": ce, "kd_real": kd_real, "kd_synthetic": kd_syn}


class DeepInversion(SyntheticReplay):
    name = "deepinversion"
    sections = ("deepinversion", "synthesis")
    tables, rank = ("methods", "data_free"), 50
    published = abd_table((18.8, 0.3), (10.9, 0.6), (5.7, 0.3))

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.first_task_loss = ce
        self.distill_loss = bind(deepinversion_loss, generator=self.generator,
                                 z_dim=self.synthesis.z_dim, mu=config.deepinversion.mu,
                                 temperature=config.kd_temperature)
