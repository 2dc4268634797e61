"""Learning without Forgetting (Li & Hoiem) and LwF.MC (iCaRL's loss without exemplars)."""
from __future__ import annotations

import functools

from abd_jax import losses, synthesis
from abd_jax.train import LossContext


def lwf(ctx: LossContext, mu: float, temperature: float):
    """CE(z[:, :K_new], y) + mu * KD(z[:, :K_old], teacher(x)[:, :K_old], T), real data only."""
    logits, _, new_bs = ctx.forward(ctx.images)
    teacher_logits, _ = ctx.teacher_forward(ctx.images)
    ce = losses.weighted_ce_loss(losses.mask_logits(logits, 0, ctx.num_seen), ctx.labels)
    kd = losses.kd_loss(losses.mask_logits(logits, 0, ctx.num_old),
                        losses.mask_logits(teacher_logits, 0, ctx.num_old), temperature)
    return ce + mu * kd, new_bs, {"ce": ce, "kd": kd}


def make_lwf_loss(mu: float, temperature: float):
    return functools.partial(lwf, mu=mu, temperature=temperature)


def lwf_mc(ctx: LossContext):
    """Sum of BCEs over the valid logits / B, old columns targeting sigmoid(teacher logits)."""
    logits, _, new_bs = ctx.forward(ctx.images)
    teacher_logits, _ = ctx.teacher_forward(ctx.images)
    loss = losses.lwf_mc_loss(logits, ctx.labels, teacher_logits, num_old=ctx.num_old,
                              num_valid=ctx.num_seen)
    return loss, new_bs, {"bce": loss}


def lwf_synthetic(ctx: LossContext, generator, z_dim: int, mu: float, temperature: float):
    """CE on real over the valid logits + mu * KD(z[:, :K_old], teacher) over real and
    synthetic (2B), with ABD's synthetic replay."""
    replay = synthesis.replay_batch(ctx, generator, z_dim)
    b = replay.num_real
    logits, _, new_bs = ctx.forward(replay.images)
    ce = losses.weighted_ce_loss(losses.mask_logits(logits[:b], 0, ctx.num_seen),
                                 replay.labels[:b])
    kd = losses.kd_loss(losses.mask_logits(logits, 0, ctx.num_old),
                        losses.mask_logits(replay.teacher_logits, 0, ctx.num_old), temperature)
    return ce + mu * kd, new_bs, {"ce": ce, "kd": kd}
