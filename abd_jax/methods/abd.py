"""ABD's learner loss (docs/algorithm.md §5) with the paper's Table 3 ablations as switches."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from abd_jax import losses, models
from abd_jax.methods.base import ce
from abd_jax.methods.published import abd_table
from abd_jax.methods.synthetic_replay import SyntheticReplay, replay
from abd_jax.session import bind
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
    # True: as the release, whose FT-CE features come from a second, no-grad forward in train
    # mode, every BatchNorm's running statistics move a second time on the same batch.
    ft_second_bn_update: bool = False


def repeat_running_average(old, new, momentum: float = models.BatchNorm.momentum):
    """BatchNorm's running statistics after a second train-mode forward of the batch that
    moved them from `old` to `new` (pytrees): new' = momentum new + (1 - momentum) batch,
    with batch = (new - momentum old) / (1 - momentum), i.e. (1 + momentum) new - momentum
    old."""
    return jax.tree.map(lambda o, n: (1 + momentum) * n - momentum * o, old, new)


def abd_loss(ctx: LossContext, generator: nn.Module, z_dim: int, opts: AbdOptions):
    """L = L_localCE + L_ftCE + mu * L_kd over x = [x_real; x_syn] (one student forward, BN
    statistics over the 2B images)."""
    rep = replay(ctx, generator, z_dim)
    b = rep.num_real
    logits, features, new_bs = ctx.forward(rep.images)
    y = rep.labels
    if opts.task_balancing:
        w = losses.task_balancing_weights(y, ctx.num_old, ctx.num_seen)
    else:
        w = jnp.ones(y.shape, jnp.float32)

    if opts.local_ce:
        valid = losses.mask_logits(logits, 0, ctx.num_seen)
        ce = losses.local_ce_loss(valid[:b], y[:b], ctx.num_old, w[:b])
    else:
        ce = losses.valid_ce_loss(logits, y, ctx.num_seen, w)
    metrics = {"ce": ce}
    loss = ce

    if opts.ft_ce:
        head = ctx.params["head"]
        ft = losses.head_finetune_ce(features, head["kernel"], head["bias"], y, w, ctx.num_seen)
        metrics["ft_ce"] = ft
        loss = loss + ft
        if opts.ft_second_bn_update:
            new_bs = repeat_running_average(ctx.batch_stats, new_bs)

    rows = slice(0 if opts.kd_on_real else b, None if opts.kd_on_synthetic else b)
    if rows.start != rows.stop:
        kd = losses.feature_kd_loss(features[rows], rep.teacher_features[rows],
                                    ctx.inputs.teacher.params["head"]["kernel"],
                                    num_old=ctx.num_old)
        metrics["feature_kd"] = kd
        loss = loss + opts.mu * kd
    return loss, new_bs, metrics


class ABD(SyntheticReplay):
    name = "abd"
    sections = ("abd", "synthesis")
    tables, rank = ("methods", "data_free", "ablations", "exemplar_free"), 60
    variants = {  # Table 3's ablations
        "abd_no_task_balancing": {"abd.task_balancing": False},
        "abd_standard_ce": {"abd.local_ce": False},
        "abd_feature_kd_synthetic_only": {"abd.kd_on_real": False},
        "abd_feature_kd_real_only": {"abd.kd_on_synthetic": False},
        "abd_no_ft_ce": {"abd.ft_ce": False},
    }
    variant_tables = ("ablations",)
    published = abd_table((43.9, 0.9), (33.7, 1.2), (20.0, 1.4))
    heads = ("linear",)  # FT-CE and the feature KD read the head's kernel and bias

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.first_task_loss = ce
        self.distill_loss = bind(abd_loss, generator=self.generator, z_dim=self.synthesis.z_dim,
                                 opts=AbdOptions(**config.abd.to_dict()))
