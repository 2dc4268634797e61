"""End-to-End Incremental Learning (Castro et al. 2018) as the release runs it (SPEC section
6b): CE plus a KD term per past task, the whole memory appended to each task, and after every
task but the first a class-balanced fine-tuning stage on the memory."""
from __future__ import annotations

import jax
from flax import struct

from abd_jax import losses, rng, train
from abd_jax.methods.base import ce
from abd_jax.methods.coreset import Coreset, TeacherRehearsal
from abd_jax.methods.lifecycle import (HeadStage, SGDLoop, Update, classes_per_task,
                                       head_state)
from abd_jax.methods.teacher import Teacher, freeze_teacher, teacher_apply, teacher_of
from abd_jax.plan import Schedule
from abd_jax.session import bind
from abd_jax.train import LossContext

WEIGHTINGS = ("mean", "sum")
BALANCED_TRAINS = ("head", "all")


@struct.dataclass
class E2EState:
    """teacher and memory as in the other coreset methods; before: the model as it was before
    the balanced stage; head: the classifier head the stage trains (head-only)."""

    teacher: Teacher
    memory: jax.Array
    before: Teacher
    head: train.TrainState


@struct.dataclass
class BalancedInputs:
    """What the balanced stage's loss reads: the previous task's model (KD over the past
    tasks) and the model before the stage (KD over the new classes; with a head-only stage,
    the frozen backbone)."""

    teacher: Teacher
    before: Teacher


def e2e_loss(ctx: LossContext, classes_per_task: int, temperature: float, weighting: str):
    """`losses.e2e_loss` on the real batch, the teacher in eval mode."""
    logits, _, new_bs = ctx.forward(ctx.images)
    teacher_logits = teacher_apply(ctx.model, ctx.method_state.teacher, ctx.images)[0]
    loss, ce, kd = losses.e2e_loss(logits, teacher_logits, ctx.labels, ctx.num_old,
                                   ctx.num_seen, classes_per_task, temperature, weighting)
    return loss, new_bs, {"ce": ce, "kd": kd}


def balanced_loss(ctx: LossContext, classes_per_task: int, temperature: float, weighting: str,
                  head_only: bool):
    """`losses.e2e_balanced_loss` on a memory batch. head_only: `ctx.params` is the head, on
    the frozen backbone's features (eval mode, the model before the stage): logits `f W + b`;
    else the whole network trains in train mode."""
    inputs: BalancedInputs = ctx.method_state
    before_logits, features = teacher_apply(ctx.model, inputs.before, ctx.images)
    if head_only:
        logits = features @ ctx.params["kernel"] + ctx.params["bias"]
        new_bs = None
    else:
        logits, _, new_bs = ctx.forward(ctx.images)
    teacher_logits = teacher_apply(ctx.model, inputs.teacher, ctx.images)[0]
    loss, ce, kd_old, kd_new = losses.e2e_balanced_loss(
        logits, teacher_logits, before_logits, ctx.labels, ctx.num_old, ctx.num_seen,
        classes_per_task, temperature, weighting)
    return loss, new_bs, {"ce": ce, "kd": kd_old, "kd_new_classes": kd_new}


class E2E(TeacherRehearsal):
    """After each task the new classes join the memory (`--config.e2e.selection`); from the
    second task on, the model is then fine-tuned on the class-balanced memory
    (`--config.e2e.*`: by default the head only, at lr / 100, with the task's epochs and
    schedule, as the release)."""

    name = "e2e"
    sections = ("coreset", "e2e")

    def __init__(self, config, spec):
        super().__init__(config, spec)
        e2e = config.e2e
        if e2e.kd_weighting not in WEIGHTINGS:
            raise ValueError(f"e2e.kd_weighting={e2e.kd_weighting!r}: use one of {WEIGHTINGS}")
        if e2e.balanced_trains not in BALANCED_TRAINS:
            raise ValueError(f"e2e.balanced_trains={e2e.balanced_trains!r}: use one of "
                             f"{BALANCED_TRAINS}")
        self.coreset = Coreset(config.coreset.memory, e2e.selection)
        self.first_task_loss = ce
        s = classes_per_task(config, spec)
        self.distill_loss = bind(e2e_loss, classes_per_task=s, temperature=config.kd_temperature,
                                 weighting=e2e.kd_weighting)
        self.balanced_loss = bind(balanced_loss, classes_per_task=s,
                                  temperature=config.kd_temperature, weighting=e2e.kd_weighting,
                                  head_only=e2e.balanced_trains == "head")

    def init_state(self, rt, learner) -> E2EState:
        return E2EState(teacher=teacher_of(learner), memory=self.coreset.empty(),
                        before=teacher_of(learner),
                        head=head_state(rt, learner, self.weight_decay(rt.config)))

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
        return learner, state.replace(memory=self.new_memory(rt, learner, state, task),
                                      before=teacher_of(learner))

    def balanced_schedule(self, config) -> Schedule:
        e2e = config.e2e
        return Schedule(e2e.balanced_epochs or config.epochs, config.lr * e2e.balanced_lr_scale,
                        () if e2e.balanced_epochs else tuple(config.lr_milestones))
