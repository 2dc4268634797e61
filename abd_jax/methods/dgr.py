"""Deep Generative Replay (Shin et al. 2017), the paper's DGR row, as the release runs it
(docs/algorithm.md §6b).

During every task after the first, each step replays B images decoded by the previous task's
variational autoencoder (`generators.ConvVAE`, the release's), labelled by the previous solver
(argmax over the past classes); the solver minimises the task-balanced CE over real + replay
plus `dgr.mu` times a KD over the past classes on the replayed images (`losses.dgr_solver_loss`).
The autoencoder learns from the same batches (the task's augmented images plus those replayed
images, with the same weights) with the solver's SGD and schedule, reset each task. The
release updates it in the same step as the solver; neither update reads the other, so it is
trained here in a second pass over the same batches (same example indices, augmentation and
replay keys), which gives the same parameters. It is kept between tasks, so its parameters
count as stored memory. The release's DGR runs without weight decay (`dgr.weight_decay`) on
images in [0, 1] (`dgr.normalize_inputs=False`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from abd_jax import generators, losses, models, rng, train
from abd_jax.methods.base import ce
from abd_jax.methods.lifecycle import Runtime, SGDLoop, Update
from abd_jax.methods.teacher import FrozenModel, TeacherMethod, freeze
from abd_jax.methods.published import abd_table
from abd_jax.plan import Task, run_schedule
from abd_jax.session import bind
from abd_jax.synthesis import frozen_apply
from abd_jax.train import LossContext


@struct.dataclass
class DGRState:
    """teacher: the previous task's solver. replay: the parameters of the autoencoder the
    current task replays from (the previous task's). vae: the autoencoder in training, with
    its SGD state (one autoencoder, trained on across tasks)."""

    teacher: FrozenModel
    replay: dict
    vae: train.TrainState


@struct.dataclass
class AutoencoderInputs:
    """What the autoencoder's loss reads: the previous task's autoencoder (the replay)."""

    previous: dict


def decode_replay(vae: generators.ConvVAE, vae_params, key, count: int, mean, std):
    """`count` images decoded from z ~ N(0, I), in [0, 1] and normalised: (x01, x_norm)."""
    z = jax.random.normal(key, (count, vae.z_dim))
    x01 = jax.lax.stop_gradient(vae.apply({"params": vae_params}, z, method=vae.decode))
    x = (x01 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x01, x


def replay_batch(ctx: LossContext, vae: generators.ConvVAE, mean, std):
    """(x, y, teacher logits of the replay) with x, y `[2B, ...]`: the real batch, then B
    images decoded by the previous autoencoder from `ctx.rng` and labelled by the teacher's
    argmax among the past classes `[0, K_old)`."""
    state: DGRState = ctx.inputs
    _, x_replay = decode_replay(vae, state.replay, ctx.rng, ctx.images.shape[0], mean, std)
    x_replay = x_replay.astype(ctx.images.dtype)
    teacher_logits = frozen_apply(ctx.model, state.teacher, x_replay)[0]
    y_replay = jnp.argmax(losses.mask_logits(teacher_logits, 0, ctx.num_old), axis=-1)
    return (jnp.concatenate([ctx.images, x_replay]),
            jnp.concatenate([ctx.labels, y_replay.astype(ctx.labels.dtype)]), teacher_logits)


def dgr_loss(ctx: LossContext, vae: generators.ConvVAE, mean, std, mu: float, temperature: float):
    """`losses.dgr_solver_loss` on [x_real; x_replay] (`replay_batch`)."""
    x, y, replay_logits = replay_batch(ctx, vae, mean, std)
    logits, _, new_bs = ctx.forward(x)
    loss, ce, kd = losses.dgr_solver_loss(logits, replay_logits, y, ctx.num_old, ctx.num_seen,
                                          mu, temperature)
    return loss, new_bs, {"ce": ce, "kd": kd}


def autoencoder_loss(ctx: LossContext, vae: generators.ConvVAE, mean, std):
    """`losses.vae_loss` of the autoencoder at `ctx.params` on the solver's batch of the same
    step: the real images in [0, 1], then (from the second task on) the images the solver
    replayed (same key), weighted as the solver weights them (1 - r real, r replayed)."""
    inputs: AutoencoderInputs = ctx.inputs
    b = ctx.images.shape[0]
    real = ctx.images * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)
    replayed, _ = decode_replay(vae, inputs.previous, ctx.rng, b, 0.0, 1.0)
    x = jnp.concatenate([real.astype(jnp.float32), replayed])
    with_replay = (ctx.num_old > 0).astype(jnp.float32)
    rows = jnp.concatenate([jnp.ones(b), jnp.full(b, with_replay)])
    labels = jnp.concatenate([ctx.labels, jnp.zeros(b, ctx.labels.dtype)])  # replay: < K_old
    weights = losses.task_balancing_weights(labels, ctx.num_old, ctx.num_seen)
    recon, z_mean, z_logvar = vae.apply({"params": ctx.params}, x,
                                        jax.random.fold_in(ctx.rng, 1))
    loss, reconstruction, kl = losses.vae_loss(recon, x, z_mean, z_logvar, weights, rows)
    return loss, None, {"reconstruction": reconstruction, "kl": kl}


class DGR(TeacherMethod):
    name = "dgr"
    sections = ("dgr",)
    tables, rank = ("methods", "data_free"), 80
    published = abd_table((14.4, 0.4), (8.1, 0.1), (4.1, 0.3))

    def __init__(self, config, spec):
        super().__init__(config, spec)
        height, _, channels = spec.image_shape
        self.vae = generators.ConvVAE(image_size=height, channels=channels,
                                  z_dim=config.dgr.z_dim)
        self.mean, self.std = self.input_stats(spec)
        self.first_task_loss = ce
        self.distill_loss = bind(dgr_loss, vae=self.vae, mean=self.mean, std=self.std,
                                 mu=config.dgr.mu, temperature=config.kd_temperature)
        self.autoencoder_loss = bind(autoencoder_loss, vae=self.vae, mean=self.mean,
                                     std=self.std)

    def input_stats(self, spec) -> tuple[tuple, tuple]:
        if self.config.dgr.normalize_inputs:
            return super().input_stats(spec)
        channels = spec.image_shape[-1]
        return (0.0,) * channels, (1.0,) * channels

    def weight_decay(self, config) -> float:
        return config.dgr.weight_decay

    def init_state(self, rt: Runtime, learner) -> DGRState:
        params = models.init_variables(rt.session, self.vae, rng.fold_in(rt.method_key, 0),
                                       (1, *rt.image_shape))["params"]
        tx = train.learner_optimizer(rt.session, rt.config.lr, rt.config.momentum,
                                     self.weight_decay(rt.config))
        vae = train.new_train_state(rt.session, self.vae, {"params": params}, tx)
        return DGRState(teacher=freeze(learner), replay=jax.tree.map(jnp.copy, params),
                        vae=vae)

    def memory_footprint(self, rt, state: DGRState) -> dict:
        return {**super().memory_footprint(rt, state),
                "generator_parameters": models.parameter_count(state.vae.params)}

    def end_task(self, task: Task) -> list:
        """The autoencoder's pass over the task's batches (not after the last task: nothing
        replays from it), then the new teacher and replay source."""
        if task.is_last:
            return super().end_task(task)
        autoencoder = SGDLoop(
            name="autoencoder", loss_fn=self.autoencoder_loss, index=self.train_index,
            inputs=lambda learner, state: AutoencoderInputs(previous=state.replay),
            schedule=run_schedule, key=lambda rt, task: rt.plan.task_key(task.index),
            slot="vae")
        return [autoencoder, Update("teacher and replay", self.teacher_and_replay)]

    def teacher_and_replay(self, rt, learner, state: DGRState, task: Task):
        del rt, task
        return learner, state.replace(teacher=freeze(learner),
                                      replay=jax.tree.map(jnp.copy, state.vae.params))
