"""R-DFCIL (Gao et al., ECCV 2022), the data-free successor of ABD, as its release runs it.

After each task a freshly initialised generator is inverted from the model (ABD's losses,
`synthesis`). A later task trains on real new-class data with a local CE, distils the
teacher's logits on synthetic images (HKD, L1) and the relations between real-image
features (RKD by angles, through two learned projections); its last epochs then train the
head alone on the frozen backbone, with class-balanced CE over real and synthetic images
plus HKD. The release's head grows a bias-free Linear per task (`--config.rdfcil.head`).
docs/methods.md lists where this follows the release and where it differs.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from abd_jax import losses, rng, synthesis, train
from abd_jax.methods.base import ce
from abd_jax.methods.lifecycle import HeadStage, Update, head_state
from abd_jax.methods.synthetic_replay import Inversion, ReplayState, SyntheticReplay, replay
from abd_jax.methods.teacher import FrozenModel, freeze, freeze_teacher
from abd_jax.plan import Schedule, Task
from abd_jax.session import bind
from abd_jax.train import LossContext

PROJECTION = "rkd_projection"  # the learner's params entry of the two RKD projections
COUNTS = "class_counts"        # the learner's batch_stats entry counting the labels trained on
HEADS = ("per_task", "shared")  # --config.rdfcil.head
HEAD_STD = 0.001  # a new task's head: cl-lite's weights_init_classifier, N(0, 0.001^2)


@dataclasses.dataclass(frozen=True)
class RdfcilOptions:
    """The loss scales, the head fine-tuning's length and rate (a fraction of `lr`) and the
    head: "per_task" (the release's, and the configs') or "shared" (the classifier's own,
    with a bias; the default, as runs made before the setting had it)."""

    lambda_ce: float = 0.5
    lambda_hkd: float = 0.15
    lambda_rkd: float = 0.5
    finetune_epochs: int = 40
    finetune_lr_scale: float = 0.05
    head: str = "shared"


@struct.dataclass
class RdfcilState(ReplayState):
    """teacher, generator: as ABD's (the generator re-initialised after every task);
    head: the head the fine-tuning trains; backbone: the model frozen when the fine-tuning
    starts; class_weights `[C]`: its CE's class weights."""

    head: train.TrainState
    backbone: FrozenModel
    class_weights: jax.Array


@struct.dataclass
class FinetuneInputs:
    """What the head fine-tuning's loss reads (no buffer of the trained head)."""

    teacher: FrozenModel
    generator_variables: dict
    backbone: FrozenModel
    class_weights: jax.Array


def _dense(params: dict, x: jax.Array) -> jax.Array:
    """x W (+ b where the layer has a bias), x `[N, D]`."""
    y = x.astype(jnp.float32) @ params["kernel"]
    return y + params["bias"] if "bias" in params else y


def _task_head(std: float):
    """`(head, key, num_old, num_seen) -> head` at a task's start, for the per-task head: the
    task's columns `[num_old, num_seen)` drawn N(0, std^2) from `key` (the release's new
    bias-free Linear), the earlier ones kept, the later ones 0 (their Linear does not exist
    yet: every loss masks them, so neither gradient nor weight decay moves them)."""
    def draw(head, key, num_old, num_seen):
        kernel = head["kernel"]
        cols = jnp.arange(kernel.shape[-1])
        fresh = std * jax.random.normal(key, kernel.shape, kernel.dtype)
        return {**head, "kernel": jnp.where(cols < num_old, kernel,
                                            jnp.where(cols < num_seen, fresh, 0.0))}

    return draw


def projection_params(key, dim: int) -> dict:
    """The two RKD projections D -> 2D (student, teacher), drawn as PyTorch's nn.Linear:
    U(-1/sqrt(D), 1/sqrt(D)) for kernels and biases."""
    bound = 1.0 / np.sqrt(dim)
    keys = jax.random.split(key, 4)
    draw = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -bound, bound)
    return {side: {"kernel": draw(keys[2 * i], (dim, 2 * dim)),
                   "bias": draw(keys[2 * i + 1], (2 * dim,))}
            for i, side in enumerate(("student", "teacher"))}


def _fresh_extras(dim: int, width: int):
    """`key -> (RKD projections, zero label counts [width], unit class weights [width])`."""
    def fresh(key):
        return (projection_params(key, dim), jnp.zeros((width,), jnp.float32),
                jnp.ones((width,), jnp.float32))

    return fresh


def _class_weights():
    return losses.class_balance_weights


def rdfcil_loss(ctx: LossContext, generator: nn.Module, z_dim: int, opts: RdfcilOptions):
    """w_ce L_localCE(real) + w_hkd HKD(syn) + w_rkd RKD(real) (`losses.rdfcil_weights`).

    The student runs twice in train mode, on the real then on the synthetic batch (BatchNorm
    statistics of each, the running statistics updated by both); the labels of both batches
    are added to the learner's class counts."""
    rep = replay(ctx, generator, z_dim)
    b = rep.num_real
    logits, features, new_bs = ctx.forward(rep.images[:b])
    syn_logits, _, new_bs = ctx.forward(rep.images[b:], new_bs)
    w_ce, w_hkd, w_rkd = losses.rdfcil_weights(opts.lambda_ce, opts.lambda_hkd,
                                               opts.lambda_rkd, ctx.num_old, ctx.num_seen)
    local_ce = losses.local_ce_loss(losses.mask_logits(logits, 0, ctx.num_seen), rep.labels[:b],
                                    ctx.num_old)
    hkd = losses.logit_l1_loss(syn_logits, rep.teacher_logits[b:], ctx.num_old)
    proj = ctx.params[PROJECTION]
    rkd = losses.rkd_angle_loss(_dense(proj["student"], features),
                                _dense(proj["teacher"], rep.teacher_features[:b]))
    counts = ctx.batch_stats[COUNTS].at[rep.labels].add(1.0)
    loss = w_ce * local_ce + w_hkd * hkd + w_rkd * rkd
    return loss, {**new_bs, COUNTS: counts}, {"ce": local_ce, "hkd": hkd, "rkd": rkd}


def finetune_loss(ctx: LossContext, generator: nn.Module, z_dim: int, opts: RdfcilOptions):
    """The head fine-tuning on the frozen backbone (eval mode), over `[x_real; x_syn]`:
    lambda_ce class-weighted CE over `[0, K_new)` + w_hkd HKD(syn). `ctx.params` is the
    head (with or without a bias)."""
    inputs: FinetuneInputs = ctx.inputs
    rep = synthesis.replay_batch(ctx, inputs.teacher, generator, inputs.generator_variables,
                                 z_dim)
    features = synthesis.frozen_apply(ctx.model, inputs.backbone, rep.images)[1]
    logits = _dense(ctx.params, features)
    _, w_hkd, _ = losses.rdfcil_weights(opts.lambda_ce, opts.lambda_hkd, opts.lambda_rkd,
                                        ctx.num_old, ctx.num_seen)
    weighted_ce = losses.class_weighted_ce_loss(losses.mask_logits(logits, 0, ctx.num_seen),
                                                rep.labels, inputs.class_weights)
    hkd = losses.logit_l1_loss(logits[rep.num_real:], rep.teacher_logits[rep.num_real:],
                               ctx.num_old)
    loss = opts.lambda_ce * weighted_ce + w_hkd * hkd
    return loss, None, {"ce": weighted_ce, "hkd": hkd}


class RDFCIL(SyntheticReplay):
    """Task 1 with plain CE; every later task with `rdfcil_loss`, then (`--config.rdfcil.
    finetune_epochs` > 0) the head fine-tuning at lr * `finetune_lr_scale`; after every task
    but the last a new generator is inverted from the model. With `--config.rdfcil.head=
    per_task` the head has no bias and each task's columns start N(0, `HEAD_STD`^2)."""

    name = "rdfcil"
    sections = ("rdfcil", "synthesis")
    tables, rank = ("data_free", "exemplar_free"), 70
    published_note = (
        "R-DFCIL's own published figures (its Table 1: 200 epochs of which 40 fine-tune the "
        "head, weight decay 5e-4, crop + flip, 5,000 generator steps, its release's class "
        "orders) are not listed: they were not checked against the paper here.")
    heads = ("linear",)  # the head fine-tuning computes f W (+ b)

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.options = RdfcilOptions(**config.rdfcil.to_dict())
        if self.options.finetune_epochs < 0:
            raise ValueError(f"rdfcil.finetune_epochs must be >= 0, got "
                             f"{self.options.finetune_epochs}")
        if self.options.head not in HEADS:
            raise ValueError(f"--config.rdfcil.head={self.options.head!r}: use one of "
                             f"{', '.join(HEADS)}")
        self.head_bias = self.options.head == "shared"
        kwargs = dict(generator=self.generator, z_dim=self.synthesis.z_dim, opts=self.options)
        self.first_task_loss = ce
        self.distill_loss = bind(rdfcil_loss, **kwargs)
        self.finetune_loss = bind(finetune_loss, **kwargs)

    def _extras(self, rt, head: dict, key) -> tuple:
        dim, width = head["kernel"].shape
        return rt.session.jitted(_fresh_extras, dim, width)(jax.device_put(key))

    def learner_variables(self, rt, variables, key) -> dict:
        """The classifier's variables, the RKD projections (params) and the label counts of
        the task (batch_stats: counted by the training steps, never trained)."""
        projection, counts, _ = self._extras(rt, variables["params"]["head"],
                                             rng.fold_in(key, 1))
        return {"params": {**variables["params"], PROJECTION: projection},
                "batch_stats": {**variables["batch_stats"], COUNTS: counts}}

    def init_state(self, rt, learner) -> RdfcilState:
        replay_state = super().init_state(rt, learner)
        _, _, unit = self._extras(rt, learner.params["head"], rt.method_key)
        return RdfcilState(teacher=replay_state.teacher, generator=replay_state.generator,
                           head=head_state(rt, learner, self.weight_decay(rt.config)),
                           backbone=freeze(learner), class_weights=unit)

    def begin_task(self, rt, learner, state, task):
        """Every task counts its labels from zero; a task after the first learns new RKD
        projections (the release creates them for each task); the per-task head draws the
        task's columns (`_task_head`)."""
        projection, counts, _ = self._extras(rt, learner.params["head"],
                                             rng.fold_in(rt.method_key, 60_000 + task.index))
        params = learner.params if task.is_first else {**learner.params,
                                                       PROJECTION: projection}
        if self.options.head == "per_task":
            args = jax.device_put((rng.fold_in(rt.method_key, 70_000 + task.index),
                                   np.int32(task.num_old), np.int32(task.num_seen)))
            params = {**params, "head": rt.session.jitted(_task_head, HEAD_STD)(
                learner.params["head"], *args)}
        learner = learner.replace(params=params,
                                  batch_stats={**learner.batch_stats, COUNTS: counts})
        return super().begin_task(rt, learner, state, task)

    def end_task(self, task: Task) -> list:
        stages = []
        if not task.is_first and self.options.finetune_epochs:
            stages += [Update("fine-tuning inputs", self.finetune_inputs), HeadStage(
                name="head_finetuning", loss_fn=self.finetune_loss, index=self.train_index,
                inputs=lambda learner, state: FinetuneInputs(
                    teacher=state.teacher, generator_variables=state.generator_variables,
                    backbone=state.backbone, class_weights=state.class_weights),
                schedule=self.finetune_schedule,
                key=lambda rt, task: rng.fold_in(rt.method_key, 20_000 + task.index),
                slot="head")]
        if task.is_last:
            return stages + [Update("teacher", freeze_teacher)]
        return stages + [Inversion(self, fresh=True),
                         Update("samples and teacher", self.samples_and_teacher)]

    def finetune_inputs(self, rt, learner, state: RdfcilState, task: Task):
        """The backbone frozen as trained; the class weights from the task's label counts."""
        weights = rt.session.jitted(_class_weights)(learner.batch_stats[COUNTS],
                                                    jax.device_put(np.int32(task.num_seen)))
        return learner, state.replace(backbone=freeze(learner), class_weights=weights)

    def finetune_schedule(self, config) -> Schedule:
        return Schedule(self.options.finetune_epochs,
                        config.lr * self.options.finetune_lr_scale, ())
