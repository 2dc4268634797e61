"""The class-incremental task loop shared by every method.

for each repeat (seed = config.seed + r, its own class order):
    for each task t: train the method's jitted step on the task's data (on device),
                     checkpoint every `checkpoint_every_steps`, evaluate on all seen tasks,
                     freeze the teacher, checkpoint the task end.
then write results.json, summary.md and accuracy.png to the workdir.

Interrupting (Ctrl-C, SIGTERM) saves a checkpoint at the last completed chunk; rerunning the
same command resumes from the newest checkpoint and reproduces the uninterrupted numbers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import resource
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from abd_jax import ahead as ahead_lib
from abd_jax import checkpoint as ckpt_lib
from abd_jax import data as data_lib
from abd_jax import input_pipeline
from abd_jax import methods as methods_lib
from abd_jax import metrics as metrics_lib
from abd_jax import hosts, logs, models
from abd_jax import preemption, programs
from abd_jax import train


@dataclasses.dataclass(frozen=True)
class Splits:
    """One dataset on the host (original labels). Images are uint8 `[N, H, W, C]` arrays, or
    `input_pipeline.SourceImages` read on demand when the run streams its data."""

    spec: data_lib.DatasetSpec
    train_images: np.ndarray | input_pipeline.SourceImages
    train_labels: np.ndarray  # int32 [N]
    test_images: np.ndarray | input_pipeline.SourceImages
    test_labels: np.ndarray

    @property
    def streamed(self) -> bool:
        return isinstance(self.train_images, input_pipeline.SourceImages)


def config_with(config, overrides: dict):
    """A copy of `config` with `overrides` (dotted keys for nested fields, e.g. `abd.mu`);
    an int given for a float field is converted."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for key, value in overrides.items():
            node = config
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = float(value) if isinstance(node[leaf], float) else value
    return config


def validate_config(config, num_devices: int,
                    spec: Optional[data_lib.DatasetSpec] = None) -> None:
    """Raise ValueError naming the fix for any setting the run cannot honour (`spec`: the
    data's, when the caller supplies splits; else `config.dataset`'s)."""
    spec = spec or data_lib.spec_of(config)
    data_lib.class_order(spec.num_classes, config.class_order, config.seed)
    spec = data_lib.classes_in_use(spec, config.num_classes)
    methods_lib.get_method(config, spec)
    data_lib.task_boundaries(spec.num_classes, config.num_tasks)
    models.create_classifier(config.model, spec.num_classes, config.dtype, config.conv_impl)
    if config.input_pipeline not in input_pipeline.PIPELINES:
        raise ValueError(f"input_pipeline={config.input_pipeline!r}: use one of "
                         f"{input_pipeline.PIPELINES} (--config.input_pipeline)")
    for name in ("batch_size", "eval_batch_size", "repeats", "epochs", "log_every_steps",
                 "checkpoint_every_steps"):
        if config[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {config[name]}; set "
                             f"--config.{name}")
    if config.batch_size % num_devices:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                         f"{num_devices} devices; set --config.batch_size to a multiple")
    if not config.lr > 0:
        raise ValueError(f"lr must be > 0, got {config.lr}; set --config.lr")
    if list(config.lr_milestones) != sorted(config.lr_milestones):
        raise ValueError(f"lr_milestones must be increasing, got {config.lr_milestones}")


def validate_task_sizes(config, splits: Splits) -> None:
    """Every task must hold at least one batch of its own training images (checked before
    anything is written to the workdir)."""
    spec = splits.spec
    order = data_lib.class_order(spec.num_classes, config.class_order, config.seed)
    labels = data_lib.remap_labels(splits.train_labels, order)
    used = data_lib.classes_in_use(spec, config.num_classes).num_classes
    for t, (lo, hi) in enumerate(data_lib.task_boundaries(used, config.num_tasks)):
        count = len(data_lib.class_indices(labels, lo, hi, config.train_per_class))
        if count < config.batch_size:
            raise ValueError(
                f"task {t + 1} has {count} training images, fewer than batch_size "
                f"{config.batch_size}; lower --config.batch_size or raise "
                "--config.train_per_class")


MIN_INDEX_CAPACITY = 2048


def shared_capacity(largest_task: int) -> int:
    """The length of `TaskInfo.index` for a run whose largest task trains on `largest_task`
    examples: the next power of two, at least `MIN_INDEX_CAPACITY`, so that runs whose tasks
    differ in size share one compiled step: a table's task-count columns and sweep folds
    often, every run on a dataset of up to 2,048 training images (digits, the tests) always.
    The batches do not depend on it: `train.epoch_order` draws one key per position (JAX's
    default partitionable threefry) and ranks only the first `count`."""
    return max(MIN_INDEX_CAPACITY, 1 << max(largest_task - 1, 0).bit_length())


def load_splits(config) -> Splits:
    """The run's dataset: read whole into host memory, or (streaming) labels only."""
    spec = data_lib.spec_of(config)
    data_dir = str(data_lib.expand_path(config.data_dir)) if config.data_dir else None
    train_labels_source = data_lib.open_split(spec, "train", data_dir, config.download,
                                              input_pipeline.labels_only())
    if not input_pipeline.use_stream(config, spec, len(train_labels_source)):
        train_x, train_y = data_lib.load_split(spec, "train", data_dir, config.download)
        test_x, test_y = data_lib.load_split(spec, "test", data_dir, config.download)
        return Splits(spec, train_x, train_y, test_x, test_y)
    logging.info("input pipeline: streaming %s from its prepared files (grain, %d worker "
                 "processes)", spec.tfds_name, config.stream_workers)
    sources = {split: data_lib.open_split(spec, split, data_dir) for split in ("train", "test")}
    test_labels_source = data_lib.open_split(spec, "test", data_dir,
                                             decoders=input_pipeline.labels_only())
    return Splits(spec, input_pipeline.SourceImages(sources["train"], spec, transform=(
                      input_pipeline.test_transform(spec))),  # herding etc.: no random crop
                  input_pipeline.split_labels(train_labels_source),
                  input_pipeline.SourceImages(sources["test"], spec,
                                              transform=input_pipeline.test_transform(spec)),
                  input_pipeline.split_labels(test_labels_source))


def peak_memory_bytes() -> int:
    """Peak device memory where the backend reports it (GPU/TPU), else the host's max RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def task_accuracies(logits: np.ndarray, labels: np.ndarray, bounds, task: int):
    """[(global, local, global top-5)] accuracy (%) on tasks 0..task; global among logits
    [0, K_new), local within task j's own logits [lo_j, hi_j); top-5: the label is among
    the 5 largest of the K_new logits (SPEC section 7: reported for ImageNet)."""
    num_seen = bounds[task][1]
    out = []
    for lo, hi in bounds[:task + 1]:
        mask = (labels >= lo) & (labels < hi)
        z, y = logits[mask][:, :num_seen], labels[mask]
        global_acc = float(np.mean(np.argmax(z, axis=1) == y)) * 100
        local_acc = float(np.mean(np.argmax(z[:, lo:hi], axis=1) + lo == y)) * 100
        top5 = np.argpartition(-z, min(5, num_seen) - 1, axis=1)[:, :5]
        top5_acc = float(np.mean((top5 == y[:, None]).any(axis=1))) * 100
        out.append((global_acc, local_acc, top5_acc))
    return out


def describe_step(step: int) -> str:
    """A checkpoint position's step in words (see `checkpoint`)."""
    if step == ckpt_lib.EVALUATE:
        return "evaluation (end-of-task hook done)"
    if step >= ckpt_lib.END_TASK:
        return f"end-of-task hook, progress {step - ckpt_lib.END_TASK}"
    return f"step {step}"


class RepeatRunner:
    """One repeat of the task loop: owns its class order, device data and checkpoints, and
    calls the method's hooks (`abd_jax.methods.lifecycle`) without knowing which it is."""

    def __init__(self, config, workdir: pathlib.Path, splits: Splits, mesh: Mesh,
                 writer: metrics_lib.MetricWriter, repeat: int):
        self.config, self.splits, self.mesh, self.writer = config, splits, mesh, writer
        self.workdir = workdir
        self.repeat = repeat
        self.seed = config.seed + repeat
        self.order = data_lib.class_order(splits.spec.num_classes, config.class_order,
                                          self.seed)
        spec = self.spec = data_lib.classes_in_use(splits.spec, config.num_classes)
        self.method = methods_lib.get_method(config, spec)
        self.train_labels = data_lib.remap_labels(splits.train_labels, self.order)
        self.test_labels = data_lib.remap_labels(splits.test_labels, self.order)
        self.bounds = data_lib.task_boundaries(spec.num_classes, config.num_tasks)
        self.model = models.create_classifier(config.model, spec.num_classes, config.dtype,
                                              config.conv_impl)
        self.replicated = NamedSharding(mesh, P())
        key = jax.random.PRNGKey(self.seed)
        self.init_key, self.run_key, method_key = jax.random.split(key, 3)
        self.mean, self.std = self.method.input_stats(spec)
        self.step_config = train.StepConfig(
            batch_size=config.batch_size, lr_decay=config.lr_decay,
            augment=data_lib.AugmentConfig(**config.augment.to_dict()),
            mean=self.mean, std=self.std)
        self.checkpointer = ckpt_lib.RunCheckpointer(
            workdir / "checkpoints" / f"repeat_{repeat}", config.keep_task_checkpoints)
        self._chunk_fns: dict[Callable, Callable] = {}  # loss_fn -> jitted chunk
        self._warm: set = set()
        self.compiled_ahead: dict[str, str] = {}  # program -> outcome (config.compile_ahead)
        self.steps_per_call = config.steps_per_call or train.default_steps_per_call()
        if splits.streamed and not config.steps_per_call:  # one call's batches travel at once
            self.steps_per_call = input_pipeline.steps_per_call_for(
                self.steps_per_call, config.batch_size, spec.image_shape)
        self.images = self.labels = None  # the training split on the mesh (device path)
        if not splits.streamed:
            self.images = hosts.to_global(splits.train_images, self.replicated)
            self.labels = hosts.to_global(self.train_labels.astype(np.int32), self.replicated)
        self.predict = train.make_predict(self.model, self.mean, self.std, mesh)
        self.rt = methods_lib.Runtime(
            config=config, model=self.model, mesh=mesh, image_shape=spec.image_shape,
            steps_per_call=self.steps_per_call,
            fresh_learner=lambda t: self._fresh_state(jax.random.fold_in(self.init_key, t)),
            task_indices=lambda t: self._class_indices(*self.bounds[t]),
            seen_indices=lambda t: self._class_indices(0, self.bounds[t][1]),
            train_labels=self.train_labels, task_key=self._task_key,
            predict_train=self._predict_train,
            train_stage=self._train_stage, checkpoint_progress=self._checkpoint_progress,
            method_key=method_key, log=self._write, save_samples=self._save_samples)
        self.index_capacity = shared_capacity(
            self.method.index_capacity(self.rt, config.num_tasks))

    # ------------------------------------------------------------------ services
    def _class_indices(self, lo: int, hi: int) -> np.ndarray:
        """int32 indices of the training examples with (remapped) labels in [lo, hi)."""
        return data_lib.class_indices(self.train_labels, lo, hi,
                                      self.config.train_per_class).astype(np.int32)

    def _fresh_state(self, key) -> train.TrainState:
        c = self.config
        state = train.create_train_state(self.model, key, self.splits.spec.image_shape, c.lr,
                                         c.momentum, self.method.weight_decay(c))
        return hosts.to_global(state, self.replicated)

    def _write(self, step, scalars, **tags) -> None:
        self.writer.write(step, scalars, repeat=self.repeat, **tags)

    def _save_samples(self, t: int, images, labels, title: str) -> None:
        if not hosts.is_main():
            return
        path = self.workdir / f"samples_repeat{self.repeat}_task{t + 1}.png"
        metrics_lib.save_sample_grid(path, images, self.order[labels], self.mean, self.std,
                                     title=title)

    def _task(self, t: int) -> methods_lib.Task:
        lo, hi = self.bounds[t]
        return methods_lib.Task(index=t, num_tasks=self.config.num_tasks, num_old=lo,
                                num_seen=hi)

    def _task_key(self, t: int):
        return jax.random.fold_in(self.run_key, t)

    def _predict_train(self, learner, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return train.predict_all(self.predict, learner, self.splits.train_images[index],
                                 self.config.eval_batch_size, self.mesh.size)

    def _task_info(self, task: methods_lib.Task, index: np.ndarray, epochs: int, key,
                   lr: Optional[float] = None, lr_milestones: Optional[tuple] = None
                   ) -> train.TaskInfo:
        """Task `task` training on `index` for `epochs`; by default at the run's learning-rate
        schedule."""
        if len(index) < self.config.batch_size:
            raise ValueError(
                f"task {task.index + 1} trains on {len(index)} images, fewer than "
                f"batch_size {self.config.batch_size}; lower --config.batch_size or raise "
                "--config.train_per_class (or --config.memory)")
        if len(index) > self.index_capacity:
            raise ValueError(f"{self.method.name} trains task {task.index + 1} on "
                             f"{len(index)} images, more than its index_capacity "
                             f"{self.index_capacity}")
        padded = np.zeros(self.index_capacity, np.int32)
        padded[:len(index)] = index
        steps_per_epoch = len(index) // self.config.batch_size
        if steps_per_epoch * epochs >= ckpt_lib.END_TASK:
            raise ValueError(f"task {task.index + 1} would train {steps_per_epoch * epochs} "
                             f"steps; at most {ckpt_lib.END_TASK - 1} fit a checkpoint "
                             "position: lower --config.epochs")
        info = train.TaskInfo(
            index=jnp.asarray(padded), count=jnp.int32(len(index)),
            num_old=jnp.int32(task.num_old), num_seen=jnp.int32(task.num_seen),
            steps_per_epoch=jnp.int32(steps_per_epoch),
            total_steps=jnp.int32(steps_per_epoch * epochs), key=key,
            base_lr=jnp.float32(self.config.lr if lr is None else lr),
            lr_milestones=train.lr_milestones(
                self.config.lr_milestones if lr_milestones is None else lr_milestones,
                len(self.config.lr_milestones)))
        return hosts.to_global(info, self.replicated)

    def _data(self, info: train.TaskInfo, start: int):
        """The chunk's data argument for steps `[start, info.total_steps)`: the split on the
        mesh, or a grain feed of host-read batches (`input_pipeline`)."""
        if not self.splits.streamed:
            return train.DeviceData(self.images, self.labels)
        c = self.config
        return input_pipeline.StreamFeed(
            self.splits.train_images.source, self.splits.spec, self.train_labels, info, start,
            c.batch_size, self.steps_per_call, self.mesh, c.stream_workers, c.stream_prefetch,
            input_pipeline.train_transform(self.splits.spec))

    def _chunk_fn(self, loss_fn: Callable) -> Callable:
        """The jitted training chunk of `loss_fn` (one compilation per loss: a training
        stage's learning rate is an argument)."""
        if loss_fn not in self._chunk_fns:
            self._chunk_fns[loss_fn] = programs.jitted(
                train.make_train_chunk, self.model, loss_fn, self.step_config, self.mesh,
                self.steps_per_call)
        return self._chunk_fns[loss_fn]

    def _train_stage(self, learner, method_state, loss_fn, index, *, epochs: int, lr: float,
                     key, task: methods_lib.Task, name: str,
                     lr_milestones: tuple = ()) -> train.TrainState:
        """See `Runtime.train_stage`. Not checkpointed inside: it runs in `end_task`, which an
        interrupt reruns whole."""
        chunk_fn = self._chunk_fn(loss_fn)
        info = self._task_info(task, index, epochs, key, lr=lr, lr_milestones=lr_milestones)
        learner = self._placed(train.reset_optimizer(learner))
        step, total = 0, int(info.total_steps)
        data = self._data(info, step)
        logging.info("repeat %d task %d: %s, %d images, %d steps at lr %g", self.repeat,
                     task.index + 1, name, len(index), total, lr)
        while step < total:
            tic = time.time()
            learner, metrics = train.run_steps(
                chunk_fn, learner, min(self.config.log_every_steps, total - step),
                self.steps_per_call, method_state, data, info)
            active = self._check_finite(metrics, task, step, f"{name} of ")
            step += int(active.sum())
            self._log(task.index, step, total, metrics, active,
                      int(active.sum()) / max(time.time() - tic, 1e-9), phase=name)
        return learner

    def _check_finite(self, metrics, task, step, where: str = "", last_saved=None):
        """The chunk's `active` mask; raises FloatingPointError at a non-finite loss."""
        active = metrics["active"] > 0
        finite = np.isfinite(metrics["loss"][active])
        if not finite.all():
            bad = step + int(np.argmin(finite)) + 1
            kept = ("" if last_saved is None else
                    f"; the last good checkpoint (task {task.index + 1} step {last_saved}) is "
                    f"kept in {self.checkpointer.directory}")
            raise FloatingPointError(
                f"non-finite loss at repeat {self.repeat} {where}task {task.index + 1} step "
                f"{bad}{kept}. Lower --config.lr or check the data.")
        return active

    def _placed(self, tree):
        """`tree` replicated on the mesh, as every jitted step returns its outputs: inputs
        placed otherwise (e.g. a fresh optimiser state on the default device) would make the
        next call compile again."""
        return hosts.to_global(tree, self.replicated)

    def _save(self, task: int, step: int, learner, method_state, result=None) -> None:
        """Checkpoint position (task, step) (see `checkpoint`) with the accuracy records,
        timings and the metrics log's length so far."""
        meta = {"accuracy": self.acc.to_dict(), "timing": self.timing, "result": result,
                "metrics_bytes": self.writer.tell()}
        self.checkpointer.save(task, step, {"state": learner, "method": method_state}, meta)

    def _checkpoint_progress(self, task, learner, method_state, progress: int) -> None:
        """See `Runtime.checkpoint_progress`."""
        self._save(task.index, ckpt_lib.END_TASK + progress, learner, method_state)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        c = self.config
        learner = self._fresh_state(self.init_key)
        _, method_state = self._placed((learner, self.method.init_state(self.rt, learner)))
        self.acc = metrics_lib.AccuracyMatrix(c.num_tasks)
        self.timing = {"train_seconds": 0.0, "train_steps": 0, "task_wall_seconds": []}
        start_task, start_step = 0, 0

        latest = self.checkpointer.restore_latest({"state": learner, "method": method_state})
        if latest is None:
            if self.repeat == 0:
                self.writer.truncate(0)  # lines of a run killed before its first checkpoint
        else:
            (start_task, start_step), restored, meta = latest
            if "metrics_bytes" in meta:  # drop lines logged after that checkpoint
                self.writer.truncate(meta["metrics_bytes"])
            if meta.get("result") is not None:
                logging.info("repeat %d already complete in the workdir", self.repeat)
                return meta["result"]
            learner, method_state = restored["state"], restored["method"]
            self.acc = metrics_lib.AccuracyMatrix.from_dict(meta["accuracy"])
            self.timing = meta["timing"]
            logging.info("resuming repeat %d at task %d %s", self.repeat, start_task + 1,
                         describe_step(start_step))

        ahead = self._start_ahead(learner, method_state, start_task) if c.compile_ahead else None
        try:
            for t in range(start_task, c.num_tasks):
                task_start = time.time()
                task = self._task(t)
                step = start_step if t == start_task else 0
                if step < ckpt_lib.END_TASK:
                    if step == 0:
                        learner, method_state = self._placed(self.method.begin_task(
                            self.rt, learner, method_state, task))
                    info = self._task_info(task, self.method.train_index(self.rt, method_state,
                                                                         task),
                                           c.epochs, self._task_key(t))
                    learner, step = self._train_task(task, step, learner, method_state, info)
                    # The end-of-task hook may be long (synthesis): don't redo training after it.
                    self._save(t, step, learner, method_state)
                if step < ckpt_lib.EVALUATE:  # (resumes a hook that saved progress in its state)
                    learner, method_state = self._placed(self.method.end_task(
                        self.rt, learner, method_state, task))
                    self._save(t, ckpt_lib.EVALUATE, learner, method_state)
                self._evaluate(task, learner, method_state)
                self.timing["task_wall_seconds"].append(time.time() - task_start)
                self._log_time_left(t)
                result = self._result(method_state) if task.is_last else None
                self._save(t + 1, 0, learner, method_state, result)
        finally:  # (also when stopped: no compiling thread outlives the run)
            if ahead is not None:
                self.compiled_ahead = ahead.join()
                logging.info("compiled ahead: %s", self.compiled_ahead)
        return self._result(method_state)

    def _start_ahead(self, learner, method_state, start_task: int) -> ahead_lib.Ahead:
        """Compile in background threads what the run calls after its first task (evaluation,
        the method's own programs, later tasks' learner chunks) and load the plotting fonts
        (see `abd_jax.ahead`)."""
        c = self.config
        batch = train.eval_batch_size(c.eval_batch_size, self.mesh.size)
        images = jax.ShapeDtypeStruct((batch, *self.splits.spec.image_shape), jnp.uint8)
        programs = [("evaluation", self.predict, (learner.params, learner.batch_stats, images))]
        programs += self.method.programs(self.rt, learner, method_state)
        first_use = {self.method.loss_fn(self._task(start_task)): start_task}
        for t in range(start_task + 1, c.num_tasks):
            first_use.setdefault(self.method.loss_fn(self._task(t)), t)
        if not self.splits.streamed:  # (streamed batches' shapes are the feed's business)
            info = self._task_info(self._task(start_task),
                                   np.zeros(c.batch_size, np.int32), 1, self.run_key)
            data = train.DeviceData(self.images, self.labels)
            programs += [(f"learner chunk of task {t + 1}",
                          self._chunk_fn(loss),
                          (learner, method_state, data, info))
                         for loss, t in first_use.items() if t > start_task]
        jobs = ahead_lib.compile_jobs(programs)
        if hosts.is_main():
            jobs.append(("plotting fonts", metrics_lib.load_plotting))
        return ahead_lib.Ahead(jobs)

    def _log_time_left(self, t: int) -> None:
        """A rough estimate: the mean wall time of this repeat's tasks so far."""
        c = self.config
        walls = self.timing["task_wall_seconds"]
        tasks_left = (c.num_tasks - t - 1) + (c.repeats - self.repeat - 1) * c.num_tasks
        left = (f"; roughly {logs.format_duration(tasks_left * float(np.mean(walls)))} left "
                f"({tasks_left} tasks)" if tasks_left else "")
        logging.info("task %d took %s%s", t + 1, logs.format_duration(walls[-1]), left)

    def _train_task(self, task, step, state, method_state, info):
        c = self.config
        t = task.index
        total = int(info.total_steps)
        chunk_fn = self._chunk_fn(self.method.loss_fn(task))
        logging.info("repeat %d task %d/%d: classes [%d, %d), %d images, %d steps (%d epochs)",
                     self.repeat, t + 1, c.num_tasks, task.num_old, task.num_seen,
                     int(info.count), total, c.epochs)
        last_saved = step
        data = self._data(info, step)
        try:
            while step < total:
                tic = time.time()
                new_state, metrics = train.run_steps(
                    chunk_fn, state, min(c.log_every_steps, total - step), self.steps_per_call,
                    method_state, data, info)
                elapsed = time.time() - tic
                active = self._check_finite(metrics, task, step, last_saved=last_saved)
                state, n = new_state, int(active.sum())
                step += n
                if chunk_fn in self._warm:  # a function's first call includes compilation
                    self.timing["train_seconds"] += elapsed
                    self.timing["train_steps"] += n
                self._warm.add(chunk_fn)
                self._log(t, step, total, metrics, active, n / max(elapsed, 1e-9))
                preemption.check()
                if step - last_saved >= c.checkpoint_every_steps and step < total:
                    self._save(t, step, state, method_state)
                    last_saved = step
        except KeyboardInterrupt:
            logging.warning("interrupted: saving a checkpoint at task %d step %d", t + 1, step)
            self._save(t, step, state, method_state)
            raise
        return state, step

    def _log(self, t, step, total, metrics, active, steps_per_second, **tags) -> None:
        means = {k: float(np.mean(v[active])) for k, v in metrics.items() if k != "active"}
        means["lr"] = float(metrics["lr"][active][-1])  # the current rate, not the mean
        images_per_second = steps_per_second * self.config.batch_size
        self._write(step, {**means, "images_per_second": images_per_second}, task=t + 1,
                    **tags)
        terms = " ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "lr")
        logging.info("task %d %sstep %d/%d %s lr %.4g %.0f img/s, %s left", t + 1,
                     "".join(f"{v} " for v in tags.values()), step, total, terms, means["lr"],
                     images_per_second,
                     logs.format_duration((total - step) / max(steps_per_second, 1e-9)))

    def _evaluate(self, task: methods_lib.Task, learner, method_state) -> None:
        t = task.index
        seen = self.test_labels < task.num_seen
        logits = train.predict_all(self.predict, learner, self.splits.test_images[seen],
                                   self.config.eval_batch_size, self.mesh.size)[0]
        logits = self.method.eval_logits(method_state, logits, task)
        for j, (g, l, top5) in enumerate(task_accuracies(logits, self.test_labels[seen],
                                                   self.bounds, t)):
            self.acc.record(t, j, g, l, top5)
        row = self.acc.global_acc[t, :t + 1]
        logging.info("after task %d: accuracy per task %s, A_%d = %.2f%%", t + 1,
                     np.round(row, 2).tolist(), t + 1, float(np.mean(row)))
        self._write(t + 1, {"A": float(np.mean(row))}, eval=1)

    def _result(self, method_state) -> dict:
        steps = max(self.timing["train_steps"], 1)
        footprint = self.method.memory_footprint(self.rt, method_state)
        return {"seed": self.seed, "class_order": self.order.tolist(),
                **self.acc.to_dict(),
                "train_seconds_per_batch": self.timing["train_seconds"] / steps,
                "task_wall_seconds": list(self.timing["task_wall_seconds"]),
                "peak_memory_bytes": peak_memory_bytes(),
                "memory": {**footprint, **metrics_lib.memory_totals(footprint)}}


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D ("data",) mesh over the first `num_devices` global devices (0: all of them, on
    every process; with several processes it must be all)."""
    devices = jax.devices()
    if jax.process_count() > 1 and num_devices not in (0, len(devices)):
        raise ValueError(f"num_devices {num_devices} leaves out devices of this run's "
                         f"{jax.process_count()} processes; set --config.num_devices=0 (all "
                         f"{len(devices)})")
    devices = devices[:num_devices] if num_devices else devices
    return Mesh(np.asarray(devices), ("data",))


def run(config, workdir, splits: Optional[Splits] = None) -> dict:
    """Run (or resume) every repeat of the experiment; returns the results dict.

    `splits` replaces loading `config.dataset` through TFDS (e.g. for timing runs)."""
    workdir = data_lib.expand_path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"workdir {workdir} is a file; pass a folder as --workdir")
    mesh = make_mesh(config.num_devices)
    validate_config(config, mesh.size, splits.spec if splits is not None else None)
    config_dict = json.loads(config.to_json())
    ckpt_lib.check_or_write_fingerprint(workdir, config_dict, write=False)
    with ckpt_lib.WorkdirLock(workdir):
        return _run_locked(config, workdir, splits, mesh, config_dict)


def _run_locked(config, workdir: pathlib.Path, splits: Optional[Splits], mesh: Mesh,
                config_dict: dict) -> dict:
    omega_reference = None  # the upper bound's results.json, for Omega
    if config.upper_bound_results:
        path = data_lib.expand_path(config.upper_bound_results)
        if not path.exists():
            raise FileNotFoundError(f"upper_bound_results {path} does not exist; run "
                                    "--config.method=upper_bound first and pass its "
                                    "results.json")
        omega_reference = json.loads(path.read_text())
    splits = splits or load_splits(config)
    validate_task_sizes(config, splits)
    # written once all is checked (by process 0 of several)
    ckpt_lib.check_or_write_fingerprint(workdir, config_dict, write=hosts.is_main())
    logging.info("devices: %s; dataset %s: %d train / %d test images", mesh.devices.tolist(),
                 config.dataset, len(splits.train_labels), len(splits.test_labels))
    logging.info("running %s: %d tasks, %d epochs each (%s, batch %d), %d repeat(s); every "
                 "setting is in %s", config.method, config.num_tasks, config.epochs,
                 config.model, config.batch_size, config.repeats, workdir / "config.json")
    title = f"{config.method} on {config.dataset}, {config.num_tasks} tasks"
    results = {}
    tensorboard = workdir / "tensorboard" if config.tensorboard else None
    # Process 0 of several writes the logs; the others' lines go nowhere (their offsets in a
    # checkpoint's meta are not stored: orbax writes process 0's JSON items).
    log_path = workdir / "metrics.jsonl" if hosts.is_main() else pathlib.Path(os.devnull)
    with metrics_lib.MetricWriter(log_path, tensorboard if hosts.is_main() else None) as writer:
        run_results = []
        for repeat in range(config.repeats):
            runner = RepeatRunner(config, workdir, splits, mesh, writer, repeat)
            try:
                run_results.append(runner.run())
            finally:  # saves are written in the background: finish them, also when stopped
                runner.checkpointer.close()
            results = metrics_lib.build_results(run_results, omega_reference)
            if hosts.is_main():
                metrics_lib.write_results(workdir, results, config_dict, title)
    agg = results["aggregate"]["final_accuracy"]
    logging.info("final accuracy A_N = %.2f +- %.2f %% over %d repeat(s); results in %s",
                 agg["mean"], agg["std"], agg["n"], workdir)
    return results
