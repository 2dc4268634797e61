"""Model-inversion synthesis (SPEC section 3) and synthetic replay (section 4).

After each task the frozen teacher is inverted: a generator G is trained so that its images
x = G(z) are confidently classified (content), cover the seen classes (diversity), reproduce
the teacher's BatchNorm statistics (stat alignment) and are smooth. During the next task, the
learner draws a synthetic batch from G (eval mode) inside its jitted step.

The stat-alignment KL reads the teacher's running statistics from its `batch_stats`
collection and the batch statistics of every BN layer's input from the `bn_inputs`
collection that the same (eval-mode) forward pass sows; with data parallelism the latter are
over the global batch.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from abd_jax import hosts, logs, losses, models, preemption, programs, train


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
    """Generator training hyper-parameters (SPEC section 3 defaults)."""

    iterations: int = 10_000
    batch_size: int = 128
    lr: float = 1e-3
    z_dim: int = 1000
    content_temperature: float = 1e3
    w_content: float = 1.0
    w_diversity: float = 1.0
    w_stat: float = 50.0
    w_smooth: float = 1e-3
    inner_bn_eps: float = 0.8
    generator_dtype: str = "float32"  # G's compute dtype (the teacher is inverted in float32)


def bn_layer_stats(bn_inputs, batch_stats) -> list[tuple]:
    """[(batch mean, batch var, running mean, running var)] of every BN layer that sowed
    `input_stats` in `bn_inputs`, paired with the running `mean`/`var` at the same module path
    in `batch_stats` (the teacher's)."""
    running = traverse_util.flatten_dict(batch_stats)
    pairs = []
    for path, ((mean, var),) in traverse_util.flatten_dict(bn_inputs).items():
        layer = path[:-1]
        pairs.append((mean, var, running[layer + ("mean",)], running[layer + ("var",)]))
    if not pairs:
        raise ValueError("the teacher sowed no BatchNorm input statistics; build it from "
                         "abd_jax.models.BatchNorm")
    return pairs


def generator_loss(gen_params, gen_batch_stats, generator: nn.Module, model: nn.Module,
                   teacher: train.Teacher, z, num_seen, cfg: SynthesisConfig):
    """L_gen = w_c L_content + w_d L_div + w_s L_stat + w_sm L_smooth for x = G(z) (train mode).

    z `[B, z_dim]`; the teacher runs in eval mode on its first `num_seen` logits.
    Returns (loss, (new generator batch_stats, {term: value})).
    """
    x, updates = generator.apply({"params": gen_params, "batch_stats": gen_batch_stats}, z,
                                 train=True, mutable=["batch_stats"])
    (logits, _), sown = model.apply(
        {"params": teacher.params, "batch_stats": teacher.batch_stats}, x, train=False,
        mutable=[models.BN_INPUTS])
    logits = losses.mask_logits(logits, 0, num_seen)
    terms = {
        "content": losses.content_loss(logits, cfg.content_temperature),
        "diversity": losses.diversity_loss(logits, num_valid=num_seen),
        "stat_alignment": losses.bn_alignment_loss(
            bn_layer_stats(sown[models.BN_INPUTS], teacher.batch_stats)),
        "smoothness": losses.smoothness_loss(x),
    }
    loss = (cfg.w_content * terms["content"] + cfg.w_diversity * terms["diversity"]
            + cfg.w_stat * terms["stat_alignment"] + cfg.w_smooth * terms["smoothness"])
    return loss, (updates["batch_stats"], terms)


def make_generator_step(generator: nn.Module, model: nn.Module, cfg: SynthesisConfig,
                        mesh: Mesh) -> Callable:
    """Pure `(gen_state, teacher, num_seen, key) -> (gen_state, metrics)`: one Adam step on a
    fresh z ~ N(0, I) drawn from `fold_in(key, gen_state.step)`, sharded over the batch."""
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    def step(gen_state: train.TrainState, teacher, num_seen, key):
        z = jax.random.normal(jax.random.fold_in(key, gen_state.step),
                              (cfg.batch_size, cfg.z_dim))
        z = jax.lax.with_sharding_constraint(z, batch_sharding)
        (loss, (new_bs, terms)), grads = jax.value_and_grad(generator_loss, has_aux=True)(
            gen_state.params, gen_state.batch_stats, generator, model, teacher, z, num_seen,
            cfg)
        gen_state = gen_state.apply_gradients(grads=grads, batch_stats=new_bs)
        gen_state = jax.lax.with_sharding_constraint(gen_state, replicated)
        return gen_state, {"loss": loss, **terms}

    return step


def sample_images(generator: nn.Module, gen_variables, key, batch_size: int, z_dim: int):
    """`[batch_size, H, W, C]` normalised synthetic images from G in eval mode."""
    z = jax.random.normal(key, (batch_size, z_dim))
    return generator.apply(gen_variables, z, train=False)


@dataclasses.dataclass(frozen=True)
class Replay:
    """A real + synthetic batch with the teacher's view of it (all `[2B, ...]`, real first)."""

    images: jax.Array
    labels: jax.Array        # real labels, then argmax teacher(x_syn)[:, :K_old]
    teacher_logits: jax.Array
    teacher_features: jax.Array
    num_real: int


def replay_batch(ctx: train.LossContext, teacher: train.Teacher, generator: nn.Module,
                 generator_variables, z_dim: int) -> Replay:
    """Draw B synthetic images from the frozen generator (eval mode), label them with the
    teacher among the past classes, and run the teacher once over [x_real; x_syn]."""
    num_real = ctx.images.shape[0]
    x_syn = sample_images(generator, generator_variables, ctx.rng, num_real, z_dim)
    x = jnp.concatenate([ctx.images, jax.lax.stop_gradient(x_syn).astype(ctx.images.dtype)])
    teacher_logits, teacher_features = jax.tree.map(
        jax.lax.stop_gradient, train.teacher_apply(ctx.model, teacher, x))
    y_syn = jnp.argmax(losses.mask_logits(teacher_logits[num_real:], 0, ctx.num_old), axis=-1)
    labels = jnp.concatenate([ctx.labels, y_syn.astype(ctx.labels.dtype)])
    return Replay(x, labels, teacher_logits, teacher_features, num_real)


class Synthesizer:
    """The persistent generator (and its Adam state) of a synthetic-replay method: created once
    per run, trained against each new teacher, sampled inside the learner step.

    The teacher is inverted in float32 whatever the classifier's compute dtype: the
    stat-alignment KL compares batch moments with running statistics, which bfloat16's 8-bit
    mantissa would blur (`self.model` is the float32 clone).

    Fused generator chunks skip the iterations past the end by masking (`train.fuse_steps`):
    2.91 vs 2.99 ms per iteration with `lax.cond` on one H200 (README, Performance)."""

    def __init__(self, cfg: SynthesisConfig, generator: nn.Module, model: nn.Module, mesh: Mesh,
                 steps_per_call: int, skip: str = "mask"):
        model = model.clone(dtype=jnp.float32) if hasattr(model, "dtype") else model
        self.cfg, self.generator, self.model, self.mesh = cfg, generator, model, mesh
        self.replicated = NamedSharding(mesh, P())
        self.steps_per_call = steps_per_call
        self.fused_step = programs.jitted(_generator_chunk, generator, model, cfg, mesh,
                                          steps_per_call, skip)
        self._sample_and_label = programs.jitted(_sample_and_label_fn, generator, model,
                                                 cfg.z_dim, static_argnums=4)

    def init(self, rng) -> train.TrainState:
        variables = models.init_variables(self.generator, rng, jnp.zeros((2, self.cfg.z_dim)),
                                          train=False)
        state = train.new_train_state(self.generator, variables,
                                      programs.shared(optax.adam, self.cfg.lr))
        return hosts.to_global(state, self.replicated)

    @staticmethod
    def variables(gen_state: train.TrainState) -> dict:
        return {"params": gen_state.params, "batch_stats": gen_state.batch_stats}

    def train(self, gen_state: train.TrainState, teacher: train.Teacher, num_seen: int, key,
              log: Optional[Callable[[int, dict], Any]] = None, log_every: int = 500, *,
              until: Optional[int] = None,
              checkpoint: Optional[Callable[[train.TrainState, int], Any]] = None,
              checkpoint_every: int = 0) -> train.TrainState:
        """Generator steps against `teacher` until `gen_state.step == until` (default: the
        step plus `cfg.iterations`), so a state saved part-way continues where it stopped.
        `log(iteration, mean terms)` every `log_every` iterations; `checkpoint(gen_state,
        iteration)` every `checkpoint_every` iterations and when a stop is requested
        (`preemption`), after which `Preempted` is raised. Iterations count from
        `until - cfg.iterations`."""
        until = int(gen_state.step) + self.cfg.iterations if until is None else until
        first = until - self.cfg.iterations
        num_seen = jnp.int32(num_seen)
        done = last_saved = int(gen_state.step) - first
        tic, start = time.time(), done
        while done < self.cfg.iterations:
            if preemption.requested():
                if checkpoint is not None and done > last_saved:
                    checkpoint(gen_state, done)
                preemption.check()
            todo = min(log_every - done % log_every, self.cfg.iterations - done)
            gen_state, metrics = train.run_steps(self.fused_step, gen_state, todo,
                                                 self.steps_per_call, until, teacher, num_seen,
                                                 key)
            active = metrics.pop("active") > 0
            if not np.isfinite(metrics["loss"][active]).all():
                raise FloatingPointError(f"non-finite generator loss near iteration {done}; "
                                         "lower --config.synthesis.lr")
            done += int(active.sum())
            means = {k: float(np.mean(v[active])) for k, v in metrics.items()}
            if log is not None:
                log(done, means)
            rate = (done - start) / max(time.time() - tic, 1e-9)
            logging.info("generator %d/%d %s (%.1f it/s, %s left)", done, self.cfg.iterations,
                         " ".join(f"{k} {v:.4f}" for k, v in means.items()), rate,
                         logs.format_duration((self.cfg.iterations - done) / max(rate, 1e-9)))
            if (checkpoint is not None and checkpoint_every and done < self.cfg.iterations
                    and done - last_saved >= checkpoint_every):
                checkpoint(gen_state, done)
                last_saved = done
        return gen_state

    def step_program(self, gen_state: train.TrainState, teacher: train.Teacher, key):
        """(the fused step, example arguments typed as `train` calls it: `until` a Python
        int, `num_seen` int32), for compiling it ahead (`abd_jax.ahead`)."""
        return self.fused_step, (gen_state, 0, teacher, jnp.int32(0), key)

    def labelled_samples(self, gen_state, teacher: train.Teacher, num_seen: int, key,
                         count: int):
        """(images `[count, H, W, C]` normalised, teacher's predicted class `[count]`), on
        the host."""
        return hosts.fetch(self._sample_and_label(self.variables(gen_state), teacher,
                                                  jnp.int32(num_seen), key, count))


def _generator_chunk(generator: nn.Module, model: nn.Module, cfg: SynthesisConfig, mesh: Mesh,
                     steps_per_call: int, skip: str):
    return train.fuse_steps(make_generator_step(generator, model, cfg, mesh), steps_per_call,
                            skip)


def _sample_and_label_fn(generator: nn.Module, model: nn.Module, z_dim: int):
    def sample_and_label(gen_variables, teacher, num_seen, key, count: int):
        x = sample_images(generator, gen_variables, key, count, z_dim)
        logits, _ = train.teacher_apply(model, teacher, x)
        return x, jnp.argmax(losses.mask_logits(logits, 0, num_seen), axis=-1)

    return sample_and_label
