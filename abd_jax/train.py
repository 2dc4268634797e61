"""The one training step shared by every method, its TrainState, and evaluation.

A method only supplies a loss function `loss_fn(ctx: LossContext) -> (loss, new_batch_stats,
metrics)` and its state pytree, which every step sees as `ctx.method_state`; batching,
augmentation, the learning-rate schedule, the optimiser update and data parallelism live
here, once.

Data parallelism: jit over a 1-D device mesh (`("data",)`), the recommended form in the
installed JAX. State and data are replicated; the per-step batch is sharded along the batch
axis, so XLA computes BatchNorm batch statistics and gradients over the *global* batch (the
cross-device means are inserted by the compiler). One and several devices therefore give the
same numbers up to float reassociation.

Every quantity that changes between tasks (which examples belong to the task, K_old, K_new,
steps per epoch) is a traced array in `TaskInfo`, so each step compiles once per run.
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

from abd_jax import data as data_lib
from abd_jax import hosts
from abd_jax import models
from abd_jax import preemption
from abd_jax import programs


class TrainState(train_state.TrainState):
    """params + optimiser state + the `batch_stats` collection; `step` counts steps in a task."""

    batch_stats: Any = None


@struct.dataclass
class Teacher:
    """The frozen model captured at the end of a task (eval mode only)."""

    params: Any
    batch_stats: Any


@struct.dataclass
class TaskInfo:
    """Per-task dynamic inputs of the step (arrays, so no recompilation between tasks or
    training stages).

    index: `[M]` int32 indices into the training arrays, the first `count` valid.
    base_lr: float32 `[]`; lr_milestones: int32 `[K]` epochs after which lr *= lr_decay
    (`NO_MILESTONE` pads: a stage without decay keeps the run's K, so its shapes).
    """

    index: jax.Array
    count: jax.Array
    num_old: jax.Array
    num_seen: jax.Array
    steps_per_epoch: jax.Array
    total_steps: jax.Array
    key: jax.Array
    base_lr: jax.Array
    lr_milestones: jax.Array


NO_MILESTONE = np.iinfo(np.int32).max


def lr_milestones(milestones, length: int) -> jax.Array:
    """int32 `[length]`: the epochs `milestones`, padded with `NO_MILESTONE`."""
    if len(milestones) > length:
        raise ValueError(f"{len(milestones)} lr milestones do not fit {length}")
    padded = np.full(length, NO_MILESTONE, np.int32)
    padded[:len(milestones)] = milestones
    return jnp.asarray(padded)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static hyper-parameters of the step (hashable)."""

    batch_size: int
    lr_decay: float
    augment: data_lib.AugmentConfig
    mean: tuple
    std: tuple


@struct.dataclass
class LossContext:
    """What a method's loss sees for one step.

    forward(x) -> (logits [n, C], features [n, D], new_batch_stats): the student in train mode.
    model: the classifier module (for the teacher's eval-mode forward, `teacher_apply`).
    method_state: the method's own state pytree (e.g. its teacher and generator).
    params, batch_stats: the trained state's (the student's: for head-only terms and
    eval-mode forwards of a frozen backbone).
    images `[B, H, W, C]` augmented and normalised, labels `[B]` remapped.
    """

    forward: Callable = struct.field(pytree_node=False)
    model: nn.Module = struct.field(pytree_node=False)
    params: Any
    batch_stats: Any
    method_state: Any
    images: jax.Array
    labels: jax.Array
    num_old: jax.Array
    num_seen: jax.Array
    rng: jax.Array


LossFn = Callable[[LossContext], tuple]


def sgd_with_weight_decay(learning_rate, momentum, weight_decay, trainable=None):
    """PyTorch SGD: g + wd * p, heavy-ball momentum, then -lr. `trainable`: the names of the
    top-level parameter groups it updates (e.g. ("head",)); the others stay exactly as they
    are (no gradient step, no weight decay). None: all."""
    sgd = optax.chain(optax.add_decayed_weights(weight_decay),
                      optax.sgd(learning_rate, momentum=momentum))
    if trainable is None:
        return sgd
    labels = lambda params: {name: jax.tree.map(
        lambda _, name=name: "train" if name in trainable else "frozen", group)
        for name, group in params.items()}
    return optax.multi_transform({"train": sgd, "frozen": optax.set_to_zero()}, labels)


def strongly_typed(tree):
    """Drop JAX weak types (e.g. from Python scalars in optimiser hyper-parameters) so that the
    state's types are the same before and after a step: no retracing on the second call."""
    return jax.tree.map(lambda a: jnp.asarray(a, dtype=jnp.asarray(a).dtype), tree)


def learner_optimizer(lr: float, momentum: float, weight_decay: float, trainable=None):
    """The learner's SGD, its learning rate injected (set by every step from the schedule);
    `trainable` as in `sgd_with_weight_decay`."""
    return optax.inject_hyperparams(sgd_with_weight_decay, static_args=("trainable",))(
        learning_rate=lr, momentum=momentum, weight_decay=weight_decay, trainable=trainable)


def new_train_state(module: nn.Module, variables: dict, tx) -> TrainState:
    """A TrainState of `module` at `variables` with a fresh state of optimiser `tx` (pass one
    from `programs.shared`), strongly typed. Its static fields (apply function, optimiser)
    are the same objects for equal modules and optimisers, so equal runs share programs."""
    state = TrainState.create(apply_fn=programs.shared(getattr, module, "apply"),
                              params=variables["params"],
                              batch_stats=variables.get("batch_stats"), tx=tx)
    return strongly_typed(state)


def create_train_state(model: nn.Module, rng, image_shape, lr, momentum, weight_decay):
    """Fresh parameters (from `rng`) and a fresh optimiser state."""
    variables = models.init_variables(model, rng, jnp.zeros((1, *image_shape), jnp.float32),
                                      train=False)
    return new_train_state(model, variables, programs.shared(learner_optimizer, lr, momentum,
                                                             weight_decay))


def reset_optimizer(state: TrainState) -> TrainState:
    """Same weights, step 0, fresh optimiser state (SPEC: reset at the start of every task)."""
    return state.replace(step=jnp.zeros_like(state.step),
                         opt_state=strongly_typed(state.tx.init(state.params)))


def with_optimizer(state: TrainState, tx) -> TrainState:
    """`state`'s weights with optimiser `tx` (pass one from `programs.shared`), fresh."""
    return reset_optimizer(state.replace(tx=tx))


def parameters_state(params, tx) -> TrainState:
    """A TrainState of bare parameters (no module, e.g. BiC's correction) and optimiser `tx`."""
    return strongly_typed(TrainState.create(apply_fn=None, params=params, tx=tx))


def teacher_of(state: TrainState) -> Teacher:
    return Teacher(params=state.params, batch_stats=state.batch_stats)


def teacher_apply(model: nn.Module, teacher: Teacher, images):
    """Eval-mode forward of the frozen model: (logits, features)."""
    return model.apply({"params": teacher.params, "batch_stats": teacher.batch_stats},
                       images, train=False)


def learning_rate(step, task: TaskInfo, cfg: StepConfig):
    """base_lr * lr_decay ** (number of milestones <= the step's epoch)."""
    epoch = step // task.steps_per_epoch
    decays = jnp.sum((epoch >= task.lr_milestones).astype(jnp.float32))
    return task.base_lr * jnp.power(cfg.lr_decay, decays)


def epoch_order(task: TaskInfo, epoch) -> jax.Array:
    """int32 `[M]` positions into `task.index` in epoch `epoch`'s shuffled order (the `count`
    valid ones first). A function of (task.key, epoch) only."""
    m = task.index.shape[0]
    keys = jax.random.uniform(jax.random.fold_in(task.key, 2 * epoch + 1), (m,))
    return jnp.argsort(jnp.where(jnp.arange(m) < task.count, keys, 2.0)).astype(jnp.int32)


def batch_indices(task: TaskInfo, step, batch_size) -> jax.Array:
    """int32 `[B]` training-example indices of the task's `step`-th batch: epoch-wise shuffled
    examples, the last partial batch of an epoch dropped."""
    epoch = step // task.steps_per_epoch
    position = step % task.steps_per_epoch
    order = epoch_order(task, epoch)
    return task.index[jax.lax.dynamic_slice(order, (position * batch_size,), (batch_size,))]


def sample_batch(images, labels, task: TaskInfo, step, batch_size):
    """The `step`-th batch `(images[chosen], labels[chosen])` (see `batch_indices`)."""
    chosen = batch_indices(task, step, batch_size)
    return images[chosen], labels[chosen]


@struct.dataclass
class DeviceData:
    """The whole training split on the mesh (input_pipeline "device"): every step gathers its
    own batch on device. images uint8 `[N, H, W, C]`, labels int32 `[N]` (remapped)."""

    images: jax.Array
    labels: jax.Array

    def batch(self, task: TaskInfo, step, batch_size):
        return sample_batch(self.images, self.labels, task, step, batch_size)


@struct.dataclass
class StreamedBatches:
    """`S` consecutive batches read on the host (input_pipeline "stream"), the first for step
    `first_step`: images uint8 `[S, B, H, W, C]`, labels int32 `[S, B]` (remapped)."""

    images: jax.Array
    labels: jax.Array
    first_step: jax.Array

    def batch(self, task: TaskInfo, step, batch_size):
        del task, batch_size
        i = jnp.clip(step - self.first_step, 0, self.images.shape[0] - 1)
        return self.images[i], self.labels[i]


class Feed:
    """Host side of a data argument that changes between jitted calls: `run_steps` replaces
    it by `next_call()` (the data for the next `steps_per_call` steps) before every call."""

    def next_call(self):
        raise NotImplementedError


def task_batch(data, task: TaskInfo, step, rng, cfg: StepConfig, mesh: Mesh,
               augment: bool = True):
    """The `step`-th batch of the task from `data` (`DeviceData` or `StreamedBatches`), on
    device: (x float32 `[B, H, W, C]` augmented (if `augment`) and normalised, sharded over
    the batch; y `[B]`)."""
    batch_sharding = NamedSharding(mesh, P("data"))
    x_uint8, y = data.batch(task, step, cfg.batch_size)
    x_uint8 = jax.lax.with_sharding_constraint(x_uint8, batch_sharding)
    if augment:
        x = data_lib.augment_batch(rng, x_uint8, cfg.augment, cfg.mean, cfg.std)
    else:
        x = data_lib.normalize(x_uint8, cfg.mean, cfg.std)
    return jax.lax.with_sharding_constraint(x, batch_sharding), y


def method_loss(model: nn.Module, loss_fn: LossFn, state: TrainState, method_state, x, y,
                task: TaskInfo, rng, params):
    """`(loss, (new_batch_stats, metrics))` of the method's loss at `params` on batch (x, y)."""

    def forward(inputs):
        (logits, feats), updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, inputs, train=True,
            mutable=["batch_stats"])
        return logits, feats, updates["batch_stats"]

    ctx = LossContext(forward=forward, model=model, params=params,
                      batch_stats=state.batch_stats, method_state=method_state,
                      images=x, labels=y, num_old=task.num_old, num_seen=task.num_seen,
                      rng=rng)
    loss, new_bs, metrics = loss_fn(ctx)
    return loss, (new_bs, metrics)


def loss_and_grads(model: nn.Module, loss_fn: LossFn, state: TrainState, method_state, x, y,
                   task: TaskInfo, rng):
    """`((loss, (new_batch_stats, metrics)), grads)` of `method_loss` w.r.t. the params."""
    loss_of = functools.partial(method_loss, model, loss_fn, state, method_state, x, y, task,
                                rng)
    return jax.value_and_grad(loss_of, has_aux=True)(state.params)


def sgd_update(state: TrainState, grads, new_batch_stats, lr) -> TrainState:
    """One optimiser step at learning rate `lr` (written into the injected hyper-params)."""
    opt_state = state.opt_state._replace(
        hyperparams={**state.opt_state.hyperparams, "learning_rate": lr})
    return state.replace(opt_state=opt_state).apply_gradients(grads=grads,
                                                              batch_stats=new_batch_stats)


def make_train_step(model: nn.Module, loss_fn: LossFn, cfg: StepConfig, mesh: Mesh):
    """Pure `(state, method_state, data, task) -> (state, metrics)`: one SGD step on the
    `state.step`-th batch of the task (from `data`, augmented and sharded on device)."""
    replicated = NamedSharding(mesh, P())

    def one_step(state: TrainState, method_state, data, task: TaskInfo):
        step = state.step
        rng = jax.random.fold_in(task.key, 2 * step)
        aug_rng, loss_rng = jax.random.split(rng)
        x, y = task_batch(data, task, step, aug_rng, cfg, mesh)
        (loss, (new_bs, metrics)), grads = loss_and_grads(model, loss_fn, state, method_state,
                                                          x, y, task, loss_rng)
        lr = learning_rate(step, task, cfg)
        state = jax.lax.with_sharding_constraint(sgd_update(state, grads, new_bs, lr),
                                                 replicated)
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
    chunk - 1 per task). Both give the same states and metrics.
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


def run_steps(fused: Callable, state, num_steps: int, steps_per_call: int, *args):
    """Host loop: call `fused(state, *args)` (a jitted `fuse_steps` function) enough times to
    cover `num_steps`; returns (state, {name: numpy [calls * steps_per_call]}). An argument
    that is a `Feed` is replaced by its `next_call()` before every call.

    A stop request (`preemption`) ends the loop early between calls: the steps done so far
    are returned (the caller then calls `preemption.check()` where its state is saved), or
    `Preempted` is raised if none was done."""
    outputs = []
    for _ in range(-(-num_steps // steps_per_call)):
        if preemption.requested():
            if not outputs:
                preemption.check()
            break
        state, out = fused(state, *(a.next_call() if isinstance(a, Feed) else a
                                    for a in args))
        outputs.append(out)
    outputs = hosts.fetch(outputs)
    return state, {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


def make_train_chunk(model: nn.Module, loss_fn: LossFn, cfg: StepConfig, mesh: Mesh,
                     chunk: int, skip: str = "cond"):
    """Pure `(state, method_state, data, task) -> (state, metrics [chunk])`: `chunk` train
    steps on `data` (`DeviceData` or `StreamedBatches`), stopping at `task.total_steps` (see
    `fuse_steps`); wrap it in `jax.jit`."""
    fused = fuse_steps(make_train_step(model, loss_fn, cfg, mesh), chunk, skip)

    def train_chunk(state, method_state, data, task):
        return fused(state, task.total_steps, method_state, data, task)

    return train_chunk


def default_steps_per_call() -> int:
    """Steps fused into one jitted call: 1 on CPU (see `make_train_chunk`), 50 elsewhere."""
    return 1 if jax.default_backend() == "cpu" else 50


def _predict_fn(model: nn.Module, mean, std, mesh: Mesh):
    batch_sharding = NamedSharding(mesh, P("data"))

    def predict(params, batch_stats, images):
        images = jax.lax.with_sharding_constraint(images, batch_sharding)
        x = data_lib.normalize(images, mean, std)
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

    return predict


def make_predict(model: nn.Module, mean: tuple, std: tuple, mesh: Mesh):
    """Jitted `(params, batch_stats, images_uint8 [B,H,W,C]) -> (logits [B, C], features
    [B, D])` (eval mode; one per process for equal arguments, see `programs`)."""
    return programs.jitted(_predict_fn, model, tuple(mean), tuple(std), mesh)


def eval_batch_size(batch_size: int, num_devices: int) -> int:
    """The batch `predict_all` feeds `predict`: `batch_size` rounded up to the devices."""
    return -(-batch_size // num_devices) * num_devices


def predict_all(predict, state_like, images: np.ndarray, batch_size: int, num_devices: int):
    """Host loop: (logits `[N, C]`, features `[N, D]`) (numpy) for uint8 images
    `[N, H, W, C]`, in fixed-size batches (the last one padded) so that a single compilation
    serves every image set."""
    batch_size = eval_batch_size(batch_size, num_devices)
    logits, features = [], []
    for start in range(0, len(images), batch_size):
        preemption.check()
        batch = images[start:start + batch_size]
        n = len(batch)
        if n < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]),
                                                    batch.dtype)])
        z, f = predict(state_like.params, state_like.batch_stats, batch)
        z, f = hosts.fetch((z, f))
        logits.append(z[:n])
        features.append(f[:n])
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(logits), np.concatenate(features)
