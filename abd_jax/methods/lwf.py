"""Learning without Forgetting (Li & Hoiem), LwF.MC (iCaRL's loss without exemplars), LwF
with ABD's synthetic replay (docs/algorithm.md §6) and LwF with a coreset of real images
(`coreset`'s random memory, §6b)."""
from __future__ import annotations

import flax.linen as nn

from abd_jax import losses
from abd_jax.methods.base import ce
from abd_jax.methods.coreset import Coreset, RandomReplayMixin, TeacherRehearsal
from abd_jax.methods.synthetic_replay import SyntheticReplay, replay
from abd_jax.methods.teacher import TeacherMethod
from abd_jax.methods.published import abd_table
from abd_jax.session import bind
from abd_jax.synthesis import frozen_apply
from abd_jax.train import LossContext


def _teacher_logits(ctx: LossContext, images):
    return frozen_apply(ctx.model, ctx.inputs.teacher, images)[0]


def _ce_plus_kd(logits, teacher_logits, labels, ctx: LossContext, mu, temperature, new_bs):
    """CE over the valid logits of the first len(labels) rows + mu * KD over `[0, K_old)` of
    all rows."""
    ce = losses.valid_ce_loss(logits[:labels.shape[0]], labels, ctx.num_seen)
    kd = losses.kd_loss(losses.mask_logits(logits, 0, ctx.num_old),
                        losses.mask_logits(teacher_logits, 0, ctx.num_old), temperature)
    return ce + mu * kd, new_bs, {"ce": ce, "kd": kd}


def lwf_loss(ctx: LossContext, mu: float, temperature: float):
    """CE(z[:, :K_new], y) + mu * KD(z[:, :K_old], teacher(x)[:, :K_old], T), real data only."""
    logits, _, new_bs = ctx.forward(ctx.images)
    return _ce_plus_kd(logits, _teacher_logits(ctx, ctx.images), ctx.labels, ctx, mu,
                       temperature, new_bs)


def lwf_mc_loss(ctx: LossContext, with_teacher: bool):
    """Sum of BCEs over the valid logits / B; with the teacher, the old columns target
    sigmoid(teacher logits); without (task 1), every column targets the one-hot label."""
    logits, _, new_bs = ctx.forward(ctx.images)
    teacher_logits = _teacher_logits(ctx, ctx.images) if with_teacher else None
    loss = losses.lwf_mc_loss(logits, ctx.labels, teacher_logits, num_old=ctx.num_old,
                              num_valid=ctx.num_seen)
    return loss, new_bs, {"bce": loss}


def lwf_synthetic_loss(ctx: LossContext, generator: nn.Module, z_dim: int, mu: float,
                       temperature: float):
    """CE on real over the valid logits + mu * KD(z[:, :K_old], teacher) over real and
    synthetic (2B), with ABD's synthetic replay."""
    rep = replay(ctx, generator, z_dim)
    logits, _, new_bs = ctx.forward(rep.images)
    return _ce_plus_kd(logits, rep.teacher_logits, rep.labels[:rep.num_real], ctx, mu,
                       temperature, new_bs)


class LwF(TeacherMethod):
    name = "lwf"
    sections = ("lwf",)
    tables, rank = ("methods", "data_free"), 20
    published = abd_table((17.0, 0.1), (9.2, 0.0), (4.7, 0.1))

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.first_task_loss = ce
        self.distill_loss = bind(lwf_loss, mu=config.lwf.mu,
                                 temperature=config.kd_temperature)


class LwFMC(TeacherMethod):
    """LwF.MC: its BCE from the first task on (one-hot targets before a teacher exists)."""

    name = "lwf_mc"
    tables, rank = ("methods", "data_free"), 30
    published = abd_table((32.5, 1.0), (17.1, 0.1), (7.7, 0.5))

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.first_task_loss = bind(lwf_mc_loss, with_teacher=False)
        self.distill_loss = bind(lwf_mc_loss, with_teacher=True)


class LwFSynthetic(SyntheticReplay):
    name = "lwf_synthetic"
    sections = ("lwf_synthetic", "synthesis")
    tables, rank = ("methods", "data_free"), 40

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.first_task_loss = ce
        self.distill_loss = bind(
            lwf_synthetic_loss, generator=self.generator, z_dim=self.synthesis.z_dim,
            mu=config.lwf_synthetic.mu, temperature=config.kd_temperature)


class LwFCoreset(RandomReplayMixin, TeacherRehearsal):
    """LwF's loss (CE + KD over the past classes) on the task's data plus a random memory."""

    name = "lwf_coreset"
    sections = ("coreset", "lwf")
    tables, rank = ("methods", "coreset"), 100
    published = abd_table((39.4, 0.3), (27.4, 0.8), (16.6, 0.4))

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.coreset = Coreset(config.coreset.memory, "random")
        self.first_task_loss = ce
        self.distill_loss = bind(lwf_loss, mu=config.lwf.mu, temperature=config.kd_temperature)
