"""End-to-End Incremental Learning (Castro et al. 2018) as the release runs it
(docs/algorithm.md §6b): CE plus a KD term per past task, the whole memory appended to each
task, and after every task but the first a class-balanced fine-tuning stage on the memory."""
from __future__ import annotations

import jax
from flax import struct

from abd_jax import losses, rng, train
from abd_jax.methods.base import ce
from abd_jax.methods.coreset import Coreset, TeacherRehearsal, no_distinct
from abd_jax.methods.lifecycle import HeadStage, SGDLoop, Update, head_state, task_bounds
from abd_jax.methods.teacher import (FrozenModel, check_bn_mode, freeze, freeze_teacher,
                                    train_mode_apply)
from abd_jax.methods.published import abd_table
from abd_jax.plan import Schedule
from abd_jax.session import bind
from abd_jax.synthesis import frozen_apply
from abd_jax.train import LossContext

WEIGHTINGS = ("mean", "sum")
BALANCED_TRAINS = ("head", "all")
NEW_CLASS_KD = ("release", "before")  # `losses.e2e_new_class_targets`


@struct.dataclass
class E2EState:
    """teacher, memory and distinct as in the other coreset methods; before: the model as it
    was before the balanced stage; head: the classifier head the stage trains (head-only)."""

    teacher: FrozenModel
    memory: jax.Array
    distinct: jax.Array
    before: FrozenModel
    head: train.TrainState


@struct.dataclass
class BalancedInputs:
    """What the balanced stage's loss reads: the previous task's model (KD over the past
    tasks) and the model before the stage (KD over the new classes; with a head-only stage,
    the frozen backbone)."""

    teacher: FrozenModel
    before: FrozenModel


def e2e_loss(ctx: LossContext, bounds: tuple, temperature: float, weighting: str):
    """`losses.e2e_loss` on the real batch, the teacher in eval mode."""
    logits, _, new_bs = ctx.forward(ctx.images)
    teacher_logits = frozen_apply(ctx.model, ctx.inputs.teacher, ctx.images)[0]
    loss, ce, kd = losses.e2e_loss(logits, teacher_logits, ctx.labels, ctx.num_old,
                                   ctx.num_seen, bounds, temperature, weighting)
    return loss, new_bs, {"ce": ce, "kd": kd}


def balanced_loss(ctx: LossContext, bounds: tuple, temperature: float, weighting: str,
                  head_only: bool, new_class_kd: str):
    """`losses.e2e_balanced_loss` on a memory batch. head_only: `ctx.params` is the head on
    the frozen backbone (the model before the stage), whose BatchNorm runs in train mode when
    the trained state carries its running statistics (`e2e.balanced_bn=train`, the release),
    else in eval mode: logits `f W + b`. Not head_only: the whole network trains in train
    mode."""
    inputs: BalancedInputs = ctx.inputs
    before_logits, features = frozen_apply(ctx.model, inputs.before, ctx.images)
    if not head_only:
        logits, _, new_bs = ctx.forward(ctx.images)
    elif ctx.batch_stats is None:
        logits, new_bs = features @ ctx.params["kernel"] + ctx.params["bias"], None
    else:
        logits, _, new_bs = train_mode_apply(ctx.model, {**inputs.before.params,
                                                         "head": ctx.params},
                                             ctx.batch_stats, ctx.images)
    teacher_logits = frozen_apply(ctx.model, inputs.teacher, ctx.images)[0]
    targets = losses.e2e_new_class_targets(teacher_logits, before_logits, ctx.num_old,
                                           new_class_kd)
    loss, ce, kd_old, kd_new = losses.e2e_balanced_loss(
        logits, teacher_logits, targets, ctx.labels, ctx.num_old, ctx.num_seen,
        bounds, temperature, weighting)
    return loss, new_bs, {"ce": ce, "kd": kd_old, "kd_new_classes": kd_new}


class E2E(TeacherRehearsal):
    """After each task the new classes join the memory (`--config.e2e.selection`); from the
    second task on, the model is then fine-tuned on the class-balanced memory
    (`--config.e2e.*`: by default the head only, at lr / 100, with the task's epochs and
    schedule, the backbone's BatchNorm in train mode, as the release)."""

    name = "e2e"
    sections = ("coreset", "e2e")
    tables, rank = ("methods", "coreset"), 110
    published = abd_table((47.4, 0.8), (38.4, 1.3), (32.7, 1.9))
    heads = ("linear",)  # the head-only stage computes f W + b

    def __init__(self, config, spec):
        super().__init__(config, spec)
        e2e = config.e2e
        if e2e.kd_weighting not in WEIGHTINGS:
            raise ValueError(f"e2e.kd_weighting={e2e.kd_weighting!r}: use one of {WEIGHTINGS}")
        if e2e.balanced_trains not in BALANCED_TRAINS:
            raise ValueError(f"e2e.balanced_trains={e2e.balanced_trains!r}: use one of "
                             f"{BALANCED_TRAINS}")
        check_bn_mode(e2e.balanced_bn, "e2e.balanced_bn")
        if e2e.new_class_kd not in NEW_CLASS_KD:
            raise ValueError(f"e2e.new_class_kd={e2e.new_class_kd!r}: use one of "
                             f"{NEW_CLASS_KD}")
        if e2e.balanced_trains == "all" and e2e.balanced_bn == "eval":
            raise ValueError("e2e.balanced_bn=eval applies to the head-only stage: with "
                             "e2e.balanced_trains=all the whole network trains in train mode; "
                             "set --config.e2e.balanced_bn=train")
        self.coreset = Coreset(config.coreset.memory, e2e.selection)
        self.first_task_loss = ce
        bounds = task_bounds(config, spec)
        self.distill_loss = bind(e2e_loss, bounds=bounds, temperature=config.kd_temperature,
                                 weighting=e2e.kd_weighting)
        self.balanced_loss = bind(balanced_loss, bounds=bounds,
                                  temperature=config.kd_temperature, weighting=e2e.kd_weighting,
                                  head_only=e2e.balanced_trains == "head",
                                  new_class_kd=e2e.new_class_kd)

    def init_state(self, rt, learner) -> E2EState:
        return E2EState(teacher=freeze(learner), memory=self.coreset.empty(),
                        distinct=no_distinct(rt), before=freeze(learner),
                        head=head_state(rt, learner, self.weight_decay(rt.config),
                                        train_bn=self.config.e2e.balanced_trains == "head"
                                        and self.config.e2e.balanced_bn == "train"))

    def end_task(self, task):
        if task.is_first:
            return super().end_task(task)
        e2e = self.config.e2e
        stage = HeadStage if e2e.balanced_trains == "head" else SGDLoop
        balanced = stage(
            name="balanced_finetuning", loss_fn=self.balanced_loss,
            index=lambda rt, state, task: self.coreset.stored(state.memory),
            inputs=lambda learner, state: BalancedInputs(teacher=state.teacher,
                                                         before=state.before),
            schedule=self.balanced_schedule,
            key=lambda rt, task: rng.fold_in(rt.method_key, 10_000 + task.index),
            slot="head" if e2e.balanced_trains == "head" else None)
        return [Update("memory", self.update_memory), balanced,
                Update("teacher", freeze_teacher)]

    def update_memory(self, rt, learner, state, task):
        """The new classes join the memory; the model is kept as it is before the stage."""
        return learner, self.remember(rt, learner, state, task).replace(
            before=freeze(learner))

    def balanced_schedule(self, config) -> Schedule:
        e2e = config.e2e
        return Schedule(e2e.balanced_epochs or config.epochs, config.lr * e2e.balanced_lr_scale,
                        () if e2e.balanced_epochs else tuple(config.lr_milestones))
