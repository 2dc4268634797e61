"""Model-inversion synthesis (docs/algorithm.md §3) and synthetic replay (section 4).

After each task the frozen teacher is inverted: a generator G is trained so that its images
x = G(z) are confidently classified (content), cover the seen classes (diversity), reproduce
the teacher's BatchNorm statistics (stat alignment) and are smooth. During the next task, the
learner draws a synthetic batch from G (eval mode) inside its jitted step. A teacher here is
anything with `.params` and `.batch_stats` (a frozen model's variables, run by `frozen_apply`,
the package's one frozen forward); the host loop that trains G is the shared driver's
(`methods.synthetic_replay`).

The stat-alignment KL reads the teacher's running statistics from its `batch_stats`
collection and the batch statistics of every BN layer's input from the `bn_inputs`
collection that the same (eval-mode) forward pass sows; with data parallelism the latter are
over the global batch.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from abd_jax import hosts, losses, models, train


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
    """Generator training hyper-parameters (docs/algorithm.md §3 defaults)."""

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


def frozen_apply(model: nn.Module, frozen, images, **kwargs):
    """Eval-mode forward of `model` at a frozen model's variables `frozen` (`.params`,
    `.batch_stats`, e.g. a `methods.teacher.FrozenModel`): (logits, features), plus what
    `kwargs` ask for (e.g. `mutable` collections)."""
    return model.apply({"params": frozen.params, "batch_stats": frozen.batch_stats}, images,
                       train=False, **kwargs)


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
                   teacher, z, num_seen, cfg: SynthesisConfig):
    """L_gen = w_c L_content + w_d L_div + w_s L_stat + w_sm L_smooth for x = G(z) (train mode).

    z `[B, z_dim]`; the teacher runs in eval mode on its first `num_seen` logits.
    Returns (loss, (new generator batch_stats, {term: value})).
    """
    x, updates = generator.apply({"params": gen_params, "batch_stats": gen_batch_stats}, z,
                                 train=True, mutable=["batch_stats"])
    (logits, _), sown = frozen_apply(model, teacher, x, mutable=[models.BN_INPUTS])
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


def replay_batch(ctx: train.LossContext, teacher, generator: nn.Module,
                 generator_variables, z_dim: int) -> Replay:
    """Draw B synthetic images from the frozen generator (eval mode), label them with the
    teacher among the past classes, and run the teacher once over [x_real; x_syn]."""
    num_real = ctx.images.shape[0]
    x_syn = sample_images(generator, generator_variables, ctx.rng, num_real, z_dim)
    x = jnp.concatenate([ctx.images, jax.lax.stop_gradient(x_syn).astype(ctx.images.dtype)])
    teacher_logits, teacher_features = jax.tree.map(
        jax.lax.stop_gradient, frozen_apply(ctx.model, teacher, x))
    y_syn = jnp.argmax(losses.mask_logits(teacher_logits[num_real:], 0, ctx.num_old), axis=-1)
    labels = jnp.concatenate([ctx.labels, y_syn.astype(ctx.labels.dtype)])
    return Replay(x, labels, teacher_logits, teacher_features, num_real)


class Synthesizer:
    """The programs of the persistent generator (and its Adam state) of a synthetic-replay
    method: created once per run, trained against each new teacher, sampled inside the learner
    step.

    The teacher is inverted in float32 whatever the classifier's compute dtype: the
    stat-alignment KL compares batch moments with running statistics, which bfloat16's 8-bit
    mantissa would blur (`self.model` is the float32 clone). Fused generator chunks skip the
    iterations past the end by masking (`train.fuse_steps`): measured faster than `lax.cond`
    on a GPU (docs/performance.md)."""

    def __init__(self, session, cfg: SynthesisConfig, generator: nn.Module, model: nn.Module,
                 mesh: Mesh, steps_per_call: int, skip: str = "mask"):
        model = model.clone(dtype=jnp.float32) if hasattr(model, "dtype") else model
        self.session, self.cfg, self.generator, self.model = session, cfg, generator, model
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, P())
        self.steps_per_call = steps_per_call
        self.fused_step = session.jitted(_generator_chunk, generator, model, cfg, mesh,
                                         steps_per_call, skip, donate_argnums=(0,))
        self._sample_and_label = session.jitted(_sample_and_label_fn, generator, model,
                                                cfg.z_dim, static_argnums=4)

    def init(self, rng) -> train.TrainState:
        variables = models.init_variables(self.session, self.generator, rng,
                                          (2, self.cfg.z_dim), train=False)
        state = train.new_train_state(self.session, self.generator, variables,
                                      self.session.shared(optax.adam, self.cfg.lr))
        return hosts.to_global(state, self.replicated)

    def step_args(self, until: int, teacher, num_seen: int, key) -> tuple:
        """The fused step's arguments after the state, placed: it stops at generator step
        `until`, inverts `teacher` over its first `num_seen` logits, draws z from `key`."""
        return hosts.to_global((np.int32(until), teacher, np.int32(num_seen),
                                np.asarray(key, np.uint32)), self.replicated)

    def labelled_samples(self, gen_state, teacher, num_seen: int, key, count: int):
        """(images `[count, H, W, C]` normalised, teacher's predicted class `[count]`), on
        the host."""
        variables = {"params": gen_state.params, "batch_stats": gen_state.batch_stats}
        placed = hosts.to_global((np.int32(num_seen), np.asarray(key, np.uint32)),
                                 self.replicated)
        return hosts.fetch(self._sample_and_label(variables, teacher, *placed, count))


def _generator_chunk(generator: nn.Module, model: nn.Module, cfg: SynthesisConfig, mesh: Mesh,
                     steps_per_call: int, skip: str):
    return train.fuse_steps(make_generator_step(generator, model, cfg, mesh), steps_per_call,
                            skip)


def _sample_and_label_fn(generator: nn.Module, model: nn.Module, z_dim: int):
    def sample_and_label(gen_variables, teacher, num_seen, key, count: int):
        x = sample_images(generator, gen_variables, key, count, z_dim)
        logits, _ = frozen_apply(model, teacher, x)
        return x, jnp.argmax(losses.mask_logits(logits, 0, num_seen), axis=-1)

    return sample_and_label
