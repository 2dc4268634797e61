"""The training step shared by every method and stage, and its TrainState.

A method supplies a loss function `loss_fn(ctx: LossContext) -> (loss, new_batch_stats,
metrics)` and what it reads besides the trained state (its state pytree, or a stage's
inputs), which every step sees as `ctx.inputs`; batching, augmentation, the learning-rate
schedule, the optimiser update and data parallelism live here, once. Which examples a step
sees is `sampling`'s business.

Data parallelism: jit over a 1-D device mesh (`("data",)`). State and data are replicated; the
step's batch is sharded along the batch axis, so XLA computes BatchNorm batch statistics and
gradients over the *global* batch (the cross-device means are inserted by the compiler). One
and several devices therefore give the same numbers up to float reassociation.

Everything that changes between tasks and stages (which examples, K_old, K_new, steps per
epoch, the schedule) is a traced array in `sampling.TaskInfo`, so each step compiles once per
loss. Chunks donate the trained state (its buffers are reused for the next one): a value that
must outlive a step (a teacher) is a copy.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from abd_jax import augment, hosts, models
from abd_jax.sampling import Feed, TaskInfo


class TrainState(train_state.TrainState):
    """params + optimiser state + the `batch_stats` collection; `step` counts steps in a stage."""

    batch_stats: Any = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static hyper-parameters of the step (hashable)."""

    batch_size: int
    lr_decay: float
    augment: augment.AugmentConfig
    mean: tuple
    std: tuple


@struct.dataclass
class LossContext:
    """What a method's loss sees for one step.

    forward(x, batch_stats=None) -> (logits [n, C], features [n, D], new_batch_stats): the
    trained module in train mode, updating the state's running statistics (or `batch_stats`,
    to chain two forwards). model: the classifier module (frozen forwards,
    `synthesis.frozen_apply`). params, batch_stats: the trained state's (head-only terms,
    eval-mode forwards of a frozen backbone). inputs: what the loss reads besides the trained
    state: the method's state (e.g. its teacher and generator), or a stage's inputs (e.g.
    `e2e.BalancedInputs`).
    images `[B, H, W, C]` augmented and normalised, labels `[B]` remapped.
    """

    forward: Callable = struct.field(pytree_node=False)
    model: nn.Module = struct.field(pytree_node=False)
    params: Any
    batch_stats: Any
    inputs: Any
    images: jax.Array
    labels: jax.Array
    num_old: jax.Array
    num_seen: jax.Array
    rng: jax.Array


LossFn = Callable[[LossContext], tuple]


def sgd_with_weight_decay(learning_rate, momentum, weight_decay):
    """PyTorch SGD: g + wd * p, heavy-ball momentum, then -lr."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate, momentum=momentum))


def learner_optimizer(session, lr: float, momentum: float, weight_decay: float):
    """The learner's SGD (and that of any stage like a task's training), its learning rate
    injected (set by every step from the schedule); one per `session` for equal settings, so
    that equal runs share the TrainState's static fields."""
    return session.shared(_injected_sgd, lr, momentum, weight_decay)


def _injected_sgd(lr: float, momentum: float, weight_decay: float):
    return optax.inject_hyperparams(sgd_with_weight_decay)(
        learning_rate=lr, momentum=momentum, weight_decay=weight_decay)


def _fresh_optimizer(tx):
    """Jitted `params -> (step 0, tx.init(params))`, strongly typed (no weak types from the
    hyper-parameters' Python scalars: the state's types are the same after a step), created on
    device (no host transfer)."""
    def init(params):
        fresh = (jnp.zeros((), jnp.int32), tx.init(params))
        return jax.tree.map(lambda a: jnp.asarray(a, dtype=jnp.asarray(a).dtype), fresh)

    return init


def new_train_state(session, module, variables: dict, tx) -> TrainState:
    """A TrainState of `module` (None: bare parameters, e.g. BiC's correction) at
    `variables` with a fresh state of optimiser `tx` (from `session.shared`). Its static fields
    are the same objects for equal modules and optimisers, so equal runs share programs."""
    step, opt_state = session.jitted(_fresh_optimizer, tx)(variables["params"])
    apply_fn = None if module is None else session.shared(getattr, module, "apply")
    return TrainState(step=step, apply_fn=apply_fn, params=variables["params"], tx=tx,
                      opt_state=opt_state, batch_stats=variables.get("batch_stats"))


def create_train_state(session, model: nn.Module, rng, image_shape, tx) -> TrainState:
    """Fresh parameters (from `rng`) and a fresh state of optimiser `tx`."""
    variables = models.init_variables(session, model, rng, (1, *image_shape), train=False)
    return new_train_state(session, model, variables, tx)


def reset_optimizer(session, state: TrainState) -> TrainState:
    """Same weights, step 0, fresh optimiser state (docs/algorithm.md §1: reset at the start of
    every task)."""
    step, opt_state = session.jitted(_fresh_optimizer, state.tx)(state.params)
    return state.replace(step=step, opt_state=opt_state)


def learning_rate(step, task: TaskInfo, lr_decay: float):
    """At the step's epoch e: base_lr * lr_decay ** (number of milestones <= e), or with a
    cosine schedule over E epochs base_lr (1 + cos(pi e / E)) / 2."""
    epoch = step // task.steps_per_epoch
    decays = jnp.sum((epoch >= task.lr_milestones).astype(jnp.float32))
    stepped = task.base_lr * jnp.power(lr_decay, decays)
    cosine = task.base_lr * 0.5 * (1 + jnp.cos(jnp.pi * epoch / jnp.maximum(task.cosine_epochs,
                                                                             1)))
    return jnp.where(task.cosine_epochs > 0, cosine, stepped)


def task_batch(data, task: TaskInfo, step, rng, cfg: StepConfig, mesh: Mesh,
               augmented: bool = True):
    """The `step`-th batch of the stage from `data` (`sampling.DeviceData` or
    `StreamedBatches`), on device: (x float32 `[B, H, W, C]` augmented (if `augmented`) and
    normalised, sharded over the batch; y `[B]`)."""
    batch_sharding = NamedSharding(mesh, P("data"))
    x_uint8, y = data.batch(task, step, cfg.batch_size)
    x_uint8 = jax.lax.with_sharding_constraint(x_uint8, batch_sharding)
    if augmented:
        x = augment.augment_batch(rng, x_uint8, cfg.augment, cfg.mean, cfg.std)
    else:
        x = augment.normalize(x_uint8, cfg.mean, cfg.std)
    return jax.lax.with_sharding_constraint(x, batch_sharding), y


def method_loss(model: nn.Module, loss_fn: LossFn, state: TrainState, inputs, x, y,
                task: TaskInfo, rng, params):
    """`(loss, (new_batch_stats, metrics))` of the method's loss at `params` on batch (x, y)."""

    def forward(images, batch_stats=None):
        (logits, feats), updates = state.apply_fn(
            {"params": params,
             "batch_stats": state.batch_stats if batch_stats is None else batch_stats},
            images, train=True, mutable=["batch_stats"])
        return logits, feats, updates["batch_stats"]

    ctx = LossContext(forward=forward, model=model, params=params,
                      batch_stats=state.batch_stats, inputs=inputs,
                      images=x, labels=y, num_old=task.num_old, num_seen=task.num_seen,
                      rng=rng)
    loss, new_bs, metrics = loss_fn(ctx)
    return loss, (new_bs, metrics)


def loss_and_grads(model: nn.Module, loss_fn: LossFn, state: TrainState, inputs, x, y,
                   task: TaskInfo, rng):
    """`((loss, (new_batch_stats, metrics)), grads)` of `method_loss` w.r.t. the params."""
    loss_of = functools.partial(method_loss, model, loss_fn, state, inputs, x, y, task, rng)
    return jax.value_and_grad(loss_of, has_aux=True)(state.params)


def sgd_update(state: TrainState, grads, new_batch_stats, lr, weight_decay=None) -> TrainState:
    """One optimiser step at learning rate `lr` (written into the injected hyper-params), and
    at `weight_decay` where it is given and not negative (else the optimiser's own)."""
    hyper = {**state.opt_state.hyperparams, "learning_rate": lr}
    if weight_decay is not None:
        own = hyper["weight_decay"]
        hyper["weight_decay"] = jnp.where(weight_decay >= 0, weight_decay, own).astype(own.dtype)
    opt_state = state.opt_state._replace(hyperparams=hyper)
    return state.replace(opt_state=opt_state).apply_gradients(grads=grads,
                                                              batch_stats=new_batch_stats)


def make_train_step(model: nn.Module, loss_fn: LossFn, cfg: StepConfig, mesh: Mesh):
    """Pure `(state, inputs, data, task) -> (state, metrics)`: one SGD step on the
    `state.step`-th batch of the stage (from `data`, augmented and sharded on device), with
    keys `fold_in(task.key, 2 * step)`. `state` is the learner or any TrainState a stage
    trains; its loss reads `inputs` as `ctx.inputs` and the classifier `model` as
    `ctx.model`."""
    replicated = NamedSharding(mesh, P())

    def one_step(state: TrainState, inputs, data, task: TaskInfo):
        step = state.step
        rng = jax.random.fold_in(task.key, 2 * step)
        aug_rng, loss_rng = jax.random.split(rng)
        x, y = task_batch(data, task, step, aug_rng, cfg, mesh)
        (loss, (new_bs, metrics)), grads = loss_and_grads(model, loss_fn, state, inputs, x, y,
                                                          task, loss_rng)
        lr = learning_rate(step, task, cfg.lr_decay)
        state = jax.lax.with_sharding_constraint(
            sgd_update(state, grads, new_bs, lr, task.weight_decay), replicated)
        return state, {"loss": loss, "lr": lr, **metrics}

    return one_step


def fuse_steps(step_fn: Callable, chunk: int, skip: str = "cond") -> Callable:
    """`(state, limit, *args) -> (state, metrics)` running `chunk` calls of
    `step_fn(state, *args) -> (state, metrics)`; `metrics[name]` gets a leading `[chunk]` axis
    plus `active` (1 for steps taken). `state.step` must count the steps.

    With chunk > 1 the steps run in a `lax.scan` (one dispatch for many steps, for GPU/TPU);
    steps with `state.step >= limit` are skipped, so the host can always use the same chunk:
    with `skip="cond"` by a `lax.cond` around the step, with `skip="mask"` by computing the
    step and keeping the old state (no conditional in the loop; the wasted steps are at most
    chunk - 1 per stage). Both give the same states and metrics.
    With chunk == 1 there is no loop and the caller must not step past `limit` (XLA:CPU runs
    convolutions inside loops several times slower, so CPU runs use chunk 1).
    """
    if skip not in ("cond", "mask"):
        raise ValueError(f"skip={skip!r}: use 'cond' or 'mask'")
    if chunk == 1:
        def single(state, limit, *args):
            del limit
            state, metrics = step_fn(state, *args)
            metrics = {**metrics, "active": jnp.ones((), jnp.float32)}
            return state, jax.tree.map(lambda m: m[None], metrics)

        return single

    def body(state, limit, args):
        active = state.step < limit
        run = lambda s: step_fn(s, *args)
        if skip == "cond":
            shapes = jax.eval_shape(run, state)[1]
            skipped = lambda s: (s, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes))
            state, metrics = jax.lax.cond(active, run, skipped, state)
        else:
            new_state, metrics = run(state)
            keep = lambda new, old: jnp.where(active, new, old)
            state = jax.tree.map(keep, new_state, state)
            metrics = jax.tree.map(lambda m: jnp.where(active, m, jnp.zeros_like(m)), metrics)
        return state, {**metrics, "active": active.astype(jnp.float32)}

    def fused(state, limit, *args):
        return jax.lax.scan(lambda s, _: body(s, limit, args), state, None, length=chunk)

    return fused


def make_train_chunk(model: nn.Module, loss_fn: LossFn, cfg: StepConfig, mesh: Mesh,
                     chunk: int, skip: str = "cond"):
    """Pure `(state, inputs, data, task) -> (state, metrics [chunk])`: `chunk` train
    steps on `data` (`DeviceData` or `StreamedBatches`), stopping at `task.total_steps` (see
    `fuse_steps`); jit it donating the state (`train_chunk`)."""
    fused = fuse_steps(make_train_step(model, loss_fn, cfg, mesh), chunk, skip)

    def train_chunk(state, inputs, data, task):
        return fused(state, task.total_steps, inputs, data, task)

    return train_chunk


def train_chunk(session, model: nn.Module, loss_fn: LossFn, cfg: StepConfig, mesh: Mesh,
                chunk: int, skip: str = "cond"):
    """`make_train_chunk` jitted (once per session for equal arguments), the state donated."""
    return session.jitted(make_train_chunk, model, loss_fn, cfg, mesh, chunk, skip,
                          donate_argnums=(0,))


def default_steps_per_call() -> int:
    """Steps fused into one jitted call: 1 on CPU (see `fuse_steps`), 50 elsewhere."""
    return 1 if jax.default_backend() == "cpu" else 50


def run_steps(fused: Callable, state, num_steps: int, steps_per_call: int, *args, stop=None):
    """Host loop: call `fused(state, *args)` (a jitted `fuse_steps` function) enough times to
    cover `num_steps`; returns (state, {name: numpy [calls * steps_per_call]}). An argument
    that is a `sampling.Feed` is replaced by its `next_call()` before every call.

    A stop request (`stop`, a `preemption.StopRequests`) ends the loop early between calls:
    the steps done so far are returned (the caller saves its state and then calls
    `stop.check()`), or `Preempted` is raised if none was done."""
    outputs = []
    for _ in range(-(-num_steps // steps_per_call)):
        if stop is not None and stop.requested():
            if not outputs:
                stop.check()
            break
        state, out = fused(state, *(a.next_call() if isinstance(a, Feed) else a
                                    for a in args))
        outputs.append(out)
    outputs = hosts.fetch(outputs)
    return state, {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
