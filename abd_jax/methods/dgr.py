"""Deep Generative Replay (Shin et al. 2017), the paper's DGR row (SPEC section 6).

After each task a variational autoencoder (`models.ConvVAE`, the release's) is trained on the
task's real images plus images replayed from its previous version; during the next task every
step replays B decoded images labelled by the previous classifier (argmax over the past
classes) and the solver minimises the task-balanced CE over real + replay (the release weights
DGR's CE as ABD's task balancing). The autoencoder is kept between tasks, so its parameters
count as stored memory.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from abd_jax import losses, models, programs, train
from abd_jax.methods import base
from abd_jax.methods.lifecycle import Runtime, Task, TeacherMethod
from abd_jax.train import LossContext


@struct.dataclass
class DGRState:
    """teacher: the previous task's classifier. vae: the autoencoder's parameters and Adam
    state (one autoencoder, trained on across tasks)."""

    teacher: train.Teacher
    vae: train.TrainState


def decode_replay(vae: models.ConvVAE, vae_params, key, count: int, mean, std):
    """`count` images decoded from z ~ N(0, I), in [0, 1] and normalised: (x01, x_norm)."""
    z = jax.random.normal(key, (count, vae.z_dim))
    x01 = jax.lax.stop_gradient(vae.apply({"params": vae_params}, z, method=vae.decode))
    x = (x01 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x01, x


def replay_batch(ctx: LossContext, vae: models.ConvVAE, mean, std):
    """(x, y) `[2B, ...]`: the real batch, then B images decoded by the previous autoencoder
    and labelled by the teacher's argmax among the past classes `[0, K_old)`."""
    state: DGRState = ctx.method_state
    _, x_replay = decode_replay(vae, state.vae.params, ctx.rng, ctx.images.shape[0], mean,
                                std)
    x_replay = x_replay.astype(ctx.images.dtype)
    teacher_logits = train.teacher_apply(ctx.model, state.teacher, x_replay)[0]
    y_replay = jnp.argmax(losses.mask_logits(teacher_logits, 0, ctx.num_old), axis=-1)
    return (jnp.concatenate([ctx.images, x_replay]),
            jnp.concatenate([ctx.labels, y_replay.astype(ctx.labels.dtype)]))


def dgr_loss(ctx: LossContext, vae: models.ConvVAE, mean, std):
    """Task-balanced CE over the valid logits of [x_real; x_replay] (`replay_batch`)."""
    x, y = replay_batch(ctx, vae, mean, std)
    logits, _, new_bs = ctx.forward(x)
    w = losses.task_balancing_weights(y, ctx.num_old, ctx.num_seen)
    ce = losses.valid_ce_loss(logits, y, ctx.num_seen, w)
    return ce, new_bs, {"ce": ce}


def make_vae_step(vae: models.ConvVAE, batch_size: int, mesh):
    """Pure `(vae_state, previous_params, replay, images, labels, task) -> (vae_state,
    metrics)`: one Adam step on the `step`-th batch of the task's images in [0, 1] (plus, when
    `replay` is 1, as many images decoded by the previous autoencoder), with the VAE loss."""
    batch_sharding = NamedSharding(mesh, P("data"))

    def step(vae_state: train.TrainState, previous_params, replay, images, labels,
             task: train.TaskInfo):
        rng = jax.random.fold_in(task.key, vae_state.step)
        replay_key, noise_key = jax.random.split(rng)
        real, _ = train.sample_batch(images, labels, task, vae_state.step, batch_size)
        real = jax.lax.with_sharding_constraint(real.astype(jnp.float32) / 255.0,
                                                batch_sharding)
        old, _ = decode_replay(vae, previous_params, replay_key, batch_size, 0.0, 1.0)
        x = jnp.concatenate([real, old])
        weights = jnp.concatenate([jnp.ones(batch_size), jnp.full(batch_size, replay)])

        def loss_of(params):
            recon, mean, logvar = vae.apply({"params": params}, x, noise_key)
            return losses.vae_loss(recon, x, mean, logvar, weights)

        loss, grads = jax.value_and_grad(loss_of)(vae_state.params)
        return vae_state.apply_gradients(grads=grads), {"loss": loss}

    return step


def _vae_chunk(vae: models.ConvVAE, batch_size: int, mesh, steps_per_call: int):
    return train.fuse_steps(make_vae_step(vae, batch_size, mesh), steps_per_call)


class DGR(TeacherMethod):
    name = "dgr"
    needs_device_data = True  # the VAE's training loop samples the split on device

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.config = config
        height, _, channels = spec.image_shape
        self.vae = models.ConvVAE(image_size=height, channels=channels,
                                  z_dim=config.dgr.z_dim)
        self.mean, self.std = tuple(spec.mean), tuple(spec.std)
        self.first_task_loss = base.ce
        self.distill_loss = programs.bind(dgr_loss, vae=self.vae, mean=self.mean,
                                          std=self.std)

    def init_state(self, rt: Runtime, learner) -> DGRState:
        h, w, c = rt.image_shape
        params = models.init_variables(self.vae, jax.random.fold_in(rt.method_key, 0),
                                       jnp.zeros((1, h, w, c)), jax.random.PRNGKey(0))["params"]
        vae = train.new_train_state(self.vae, {"params": params},
                                    programs.shared(optax.adam, self.config.dgr.lr))
        return DGRState(teacher=train.teacher_of(learner), vae=vae)

    def memory_footprint(self, rt, state: DGRState) -> dict:
        count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.vae.params))
        return {**super().memory_footprint(rt, state), "generator_parameters": count}

    def vae_chunk(self, rt: Runtime):
        """The jitted autoencoder chunk (one per process for equal settings, `programs`)."""
        return programs.jitted(_vae_chunk, self.vae, self.config.batch_size, rt.mesh,
                               rt.steps_per_call)

    def end_task(self, rt: Runtime, learner, state: DGRState, task: Task):
        teacher = train.teacher_of(learner)
        if task.is_last:
            return learner, state.replace(teacher=teacher)
        epochs = self.config.dgr.epochs or self.config.epochs
        info = rt.task_info(task, rt.task_indices(task.index), epochs,
                            jax.random.fold_in(rt.method_key, task.index + 1))
        total = int(info.total_steps)
        previous = state.vae.params
        replay = jnp.float32(0.0 if task.is_first else 1.0)
        vae_state = state.vae.replace(step=jnp.zeros_like(state.vae.step))
        chunk = self.vae_chunk(rt)
        done = 0
        while done < total:
            todo = min(self.config.log_every_steps, total - done)
            vae_state, metrics = train.run_steps(chunk, vae_state, todo, rt.steps_per_call,
                                                 total, previous, replay, rt.device_images,
                                                 rt.device_labels, info)
            active = metrics["active"] > 0
            if not np.isfinite(metrics["loss"][active]).all():
                raise FloatingPointError(f"non-finite autoencoder loss after task "
                                         f"{task.index + 1}; lower --config.dgr.lr")
            done += int(active.sum())
            rt.log(done, {"loss": float(np.mean(metrics["loss"][active]))},
                   task=task.index + 1, phase="autoencoder")
        return learner, DGRState(teacher=teacher, vae=vae_state)
