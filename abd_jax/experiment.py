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
import pathlib
import resource
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from abd_jax import checkpoint as ckpt_lib
from abd_jax import data as data_lib
from abd_jax import methods as methods_lib
from abd_jax import metrics as metrics_lib
from abd_jax import models
from abd_jax import synthesis
from abd_jax import train


@dataclasses.dataclass(frozen=True)
class Splits:
    """Host copies of one dataset (original labels)."""

    spec: data_lib.DatasetSpec
    train_images: np.ndarray  # uint8 [N, H, W, C]
    train_labels: np.ndarray  # int32 [N]
    test_images: np.ndarray
    test_labels: np.ndarray


def validate_config(config, num_devices: int) -> None:
    """Raise ValueError naming the fix for any setting the run cannot honour."""
    spec = data_lib.get_spec(config.dataset)
    methods_lib.get_method(config, spec.image_shape)
    data_lib.task_boundaries(spec.num_classes, config.num_tasks)
    data_lib.class_order(spec.num_classes, config.class_order, config.seed)
    models.create_classifier(config.model, spec.num_classes, config.dtype, config.conv_impl)
    if config.batch_size % num_devices:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                         f"{num_devices} devices; set --config.batch_size to a multiple")
    for name in ("repeats", "epochs", "log_every_steps", "checkpoint_every_steps"):
        if config[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {config[name]}")
    if list(config.lr_milestones) != sorted(config.lr_milestones):
        raise ValueError(f"lr_milestones must be increasing, got {config.lr_milestones}")


def load_splits(config) -> Splits:
    spec = data_lib.get_spec(config.dataset)
    data_dir = config.data_dir or None
    train_x, train_y = data_lib.load_split(spec, "train", data_dir, config.download)
    test_x, test_y = data_lib.load_split(spec, "test", data_dir, config.download)
    return Splits(spec, train_x, train_y, test_x, test_y)


def peak_memory_bytes() -> int:
    """Peak device memory where the backend reports it (GPU/TPU), else the host's max RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def task_accuracies(logits: np.ndarray, labels: np.ndarray, bounds, task: int):
    """[(global, local)] accuracy (%) on tasks 0..task; global among logits [0, K_new),
    local within task j's own logits [lo_j, hi_j)."""
    num_seen = bounds[task][1]
    out = []
    for lo, hi in bounds[:task + 1]:
        mask = (labels >= lo) & (labels < hi)
        z, y = logits[mask], labels[mask]
        global_acc = float(np.mean(np.argmax(z[:, :num_seen], axis=1) == y)) * 100
        local_acc = float(np.mean(np.argmax(z[:, lo:hi], axis=1) + lo == y)) * 100
        out.append((global_acc, local_acc))
    return out


class RepeatRunner:
    """One repeat of the task loop: owns its class order, device data and checkpoints."""

    def __init__(self, config, workdir: pathlib.Path, splits: Splits, mesh: Mesh,
                 writer: metrics_lib.MetricWriter, repeat: int):
        self.config, self.splits, self.mesh, self.writer = config, splits, mesh, writer
        self.workdir = workdir
        self.repeat = repeat
        self.seed = config.seed + repeat
        spec = splits.spec
        self.method = methods_lib.get_method(config, spec.image_shape)
        self.num_classes = spec.num_classes
        self.order = data_lib.class_order(spec.num_classes, config.class_order, self.seed)
        self.train_labels = data_lib.remap_labels(splits.train_labels, self.order)
        self.test_labels = data_lib.remap_labels(splits.test_labels, self.order)
        self.bounds = data_lib.task_boundaries(spec.num_classes, config.num_tasks)
        self.task_index = self._task_indices()
        self.model = models.create_classifier(config.model, spec.num_classes, config.dtype,
                                              config.conv_impl)
        self.replicated = NamedSharding(mesh, P())
        key = jax.random.PRNGKey(self.seed)
        self.init_key, self.run_key, self.generator_key = jax.random.split(key, 3)
        self.step_config = train.StepConfig(
            batch_size=config.batch_size, base_lr=config.lr,
            lr_milestones=tuple(config.lr_milestones), lr_decay=config.lr_decay,
            augment=data_lib.AugmentConfig(**config.augment.to_dict()),
            mean=tuple(spec.mean), std=tuple(spec.std))
        self.checkpointer = ckpt_lib.RunCheckpointer(workdir / "checkpoints" / f"repeat_{repeat}")
        self._chunk_fns: dict[bool, Callable] = {}
        self._warm: set = set()
        self.steps_per_call = config.steps_per_call or train.default_steps_per_call()
        self.images = jax.device_put(splits.train_images, self.replicated)
        self.labels = jax.device_put(self.train_labels.astype(np.int32), self.replicated)
        self.predict = train.make_predict(self.model, tuple(spec.mean), tuple(spec.std), mesh)
        self.synthesizer = None
        if self.method.synthesis is not None:
            self.synthesizer = synthesis.Synthesizer(self.method.synthesis, self.method.generator,
                                                     self.model, mesh, self.steps_per_call)

    # ------------------------------------------------------------------ setup helpers
    def _task_indices(self) -> list[np.ndarray]:
        """Training example indices per task (all seen tasks for the upper bound)."""
        out = []
        for t, (lo, hi) in enumerate(self.bounds):
            lo = 0 if self.method.retrain_on_all_seen else lo
            idx = data_lib.class_indices(self.train_labels, lo, hi,
                                         self.config.train_per_class)
            if len(idx) < self.config.batch_size:
                raise ValueError(
                    f"task {t + 1} has {len(idx)} training images, fewer than batch_size "
                    f"{self.config.batch_size}; lower --config.batch_size or raise "
                    "--config.train_per_class")
            out.append(idx.astype(np.int32))
        return out

    def _fresh_state(self, key) -> train.TrainState:
        c = self.config
        state = train.create_train_state(self.model, key, self.splits.spec.image_shape, c.lr,
                                         c.momentum, c.weight_decay)
        return jax.device_put(state, self.replicated)

    def _task_info(self, t: int) -> train.TaskInfo:
        idx = self.task_index[t]
        padded = np.zeros(max(len(i) for i in self.task_index), np.int32)
        padded[:len(idx)] = idx
        steps_per_epoch = len(idx) // self.config.batch_size
        lo, hi = self.bounds[t]
        info = train.TaskInfo(
            index=jnp.asarray(padded), count=jnp.int32(len(idx)), num_old=jnp.int32(lo),
            num_seen=jnp.int32(hi), steps_per_epoch=jnp.int32(steps_per_epoch),
            total_steps=jnp.int32(steps_per_epoch * self.config.epochs),
            key=jax.random.fold_in(self.run_key, t))
        return jax.device_put(info, self.replicated)

    def _chunk_fn(self, with_teacher: bool) -> Callable:
        if with_teacher not in self._chunk_fns:
            # Before the first teacher exists every method trains with plain CE.
            use_method_loss = with_teacher or not self.method.uses_teacher
            loss = self.method.loss if use_method_loss else train.cross_entropy_loss
            self._chunk_fns[with_teacher] = jax.jit(train.make_train_chunk(
                self.model, loss, self.step_config, self.mesh, self.steps_per_call))
        return self._chunk_fns[with_teacher]

    def _tree(self, state, teacher, generator) -> dict:
        tree = {"state": state}
        if teacher is not None:
            tree["teacher"] = teacher
        if generator is not None:
            tree["generator"] = generator
        return tree

    def _save(self, task, step, state, teacher, meta) -> None:
        self.checkpointer.save(task, step, self._tree(state, teacher, self.gen_state), meta)

    def _frozen(self, teacher) -> Optional[train.Frozen]:
        if teacher is None:
            return None
        extra = None if self.synthesizer is None else self.synthesizer.variables(self.gen_state)
        return train.Frozen(teacher=teacher, extra=extra)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        c = self.config
        state = self._fresh_state(self.init_key)
        teacher: Optional[train.Teacher] = None
        self.gen_state = None
        if self.synthesizer is not None:
            self.gen_state = self.synthesizer.init(jax.random.fold_in(self.generator_key, 0))
        acc = metrics_lib.AccuracyMatrix(c.num_tasks)
        timing = {"train_seconds": 0.0, "train_steps": 0, "task_wall_seconds": []}
        start_task, start_step = 0, 0

        position = self.checkpointer.latest()
        if position is not None:
            meta = self.checkpointer.restore_meta()
            if meta.get("result") is not None:
                logging.info("repeat %d already complete in the workdir", self.repeat)
                return meta["result"]
            start_task, start_step = position
            has_teacher = start_task > 0 and self.method.uses_teacher
            restored = self.checkpointer.restore(self._tree(
                state, train.teacher_of(state) if has_teacher else None, self.gen_state))
            state, teacher = restored["state"], restored.get("teacher")
            self.gen_state = restored.get("generator")
            acc = metrics_lib.AccuracyMatrix.from_dict(meta["accuracy"])
            timing = meta["timing"]
            logging.info("resuming repeat %d at task %d step %d", self.repeat, start_task + 1,
                         start_step)

        for t in range(start_task, c.num_tasks):
            task_start = time.time()
            step = start_step if t == start_task else 0
            if step == 0:
                if self.method.retrain_on_all_seen and t > 0:
                    state = self._fresh_state(jax.random.fold_in(self.init_key, t))
                else:
                    state = jax.device_put(train.reset_optimizer(state), self.replicated)
            state, step = self._train_task(t, step, state, teacher, acc, timing)
            if self.synthesizer is not None:  # synthesis is long: don't redo training after it
                self._save(t, step, state, teacher,
                           {"accuracy": acc.to_dict(), "timing": timing, "result": None})
            self._evaluate(t, state, acc)
            if self.method.uses_teacher:
                teacher = train.teacher_of(state)
            if self.synthesizer is not None and t < c.num_tasks - 1:
                self._synthesize(t, teacher)
            timing["task_wall_seconds"].append(time.time() - task_start)
            result = self._result(acc, timing) if t == c.num_tasks - 1 else None
            self._save(t + 1, 0, state, teacher,
                       {"accuracy": acc.to_dict(), "timing": timing, "result": result})
        return self._result(acc, timing)

    def _train_task(self, t, step, state, teacher, acc, timing):
        c = self.config
        info = self._task_info(t)
        total = int(info.total_steps)
        frozen = self._frozen(teacher)
        chunk_fn = self._chunk_fn(frozen is not None)
        lo, hi = self.bounds[t]
        logging.info("repeat %d task %d/%d: classes [%d, %d), %d images, %d steps (%d epochs)",
                     self.repeat, t + 1, c.num_tasks, lo, hi, int(info.count), total, c.epochs)
        last_saved = step
        try:
            while step < total:
                tic = time.time()
                new_state, metrics = train.run_steps(
                    chunk_fn, state, min(c.log_every_steps, total - step), self.steps_per_call,
                    frozen, self.images, self.labels, info)
                elapsed = time.time() - tic
                active = metrics["active"] > 0
                finite = np.isfinite(metrics["loss"][active])
                if not finite.all():
                    bad = step + int(np.argmin(finite)) + 1
                    raise FloatingPointError(
                        f"non-finite loss at repeat {self.repeat} task {t + 1} step {bad}; the "
                        f"last good checkpoint (task {t + 1} step {last_saved}) is kept in "
                        f"{self.checkpointer.directory}. Lower --config.lr or check the data.")
                state, n = new_state, int(active.sum())
                step += n
                if chunk_fn in self._warm:  # a function's first call includes compilation
                    timing["train_seconds"] += elapsed
                    timing["train_steps"] += n
                self._warm.add(chunk_fn)
                self._log(t, step, total, metrics, active, n / max(elapsed, 1e-9))
                if step - last_saved >= c.checkpoint_every_steps and step < total:
                    self._save(t, step, state, teacher,
                               {"accuracy": acc.to_dict(), "timing": timing, "result": None})
                    last_saved = step
        except KeyboardInterrupt:
            logging.warning("interrupted: saving a checkpoint at task %d step %d", t + 1, step)
            self._save(t, step, state, teacher,
                       {"accuracy": acc.to_dict(), "timing": timing, "result": None})
            raise
        return state, step

    def _synthesize(self, t: int, teacher: train.Teacher) -> None:
        """Invert the new teacher into the generator; save a labelled sample grid."""
        num_seen = self.bounds[t][1]
        logging.info("repeat %d task %d: training the generator for %d iterations",
                     self.repeat, t + 1, self.synthesizer.cfg.iterations)
        log = lambda it, terms: self.writer.write(it, terms, repeat=self.repeat, task=t + 1,
                                                  phase="generator")
        self.gen_state = self.synthesizer.train(
            self.gen_state, teacher, num_seen, jax.random.fold_in(self.generator_key, t + 1),
            log=log, log_every=self.config.synthesis_log_every)
        images, predicted = self.synthesizer.labelled_samples(
            self.gen_state, teacher, num_seen, jax.random.fold_in(self.generator_key, 1000 + t),
            self.config.sample_grid_size)
        spec = self.splits.spec
        path = self.workdir / f"samples_repeat{self.repeat}_task{t + 1}.png"
        metrics_lib.save_sample_grid(path, images, self.order[predicted], spec.mean, spec.std,
                                     title=f"synthetic samples after task {t + 1} "
                                           "(teacher's predicted class, original class id)")

    def _log(self, t, step, total, metrics, active, steps_per_second) -> None:
        means = {k: float(np.mean(v[active])) for k, v in metrics.items() if k != "active"}
        means["lr"] = float(metrics["lr"][active][-1])  # the current rate, not the mean
        images_per_second = steps_per_second * self.config.batch_size
        self.writer.write(step, {**means, "images_per_second": images_per_second},
                          repeat=self.repeat, task=t + 1)
        terms = " ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "lr")
        logging.info("task %d step %d/%d %s lr %.4g %.0f img/s", t + 1, step, total, terms,
                     means["lr"], images_per_second)

    def _evaluate(self, t, state, acc) -> None:
        seen = self.test_labels < self.bounds[t][1]
        logits = train.predict_logits(self.predict, state, self.splits.test_images[seen],
                                      self.config.eval_batch_size, self.mesh.size)
        for j, (g, l) in enumerate(task_accuracies(logits, self.test_labels[seen],
                                                   self.bounds, t)):
            acc.record(t, j, g, l)
        row = acc.global_acc[t, :t + 1]
        logging.info("after task %d: accuracy per task %s, A_%d = %.2f%%", t + 1,
                     np.round(row, 2).tolist(), t + 1, float(np.mean(row)))
        self.writer.write(t + 1, {"A": float(np.mean(row))}, repeat=self.repeat, eval=1)

    def _result(self, acc, timing) -> dict:
        steps = max(timing["train_steps"], 1)
        return {"seed": self.seed, "class_order": self.order.tolist(),
                **acc.to_dict(),
                "train_seconds_per_batch": timing["train_seconds"] / steps,
                "task_wall_seconds": list(timing["task_wall_seconds"]),
                "peak_memory_bytes": peak_memory_bytes()}


def make_mesh(num_devices: int = 0) -> Mesh:
    devices = jax.devices()
    devices = devices[:num_devices] if num_devices else devices
    return Mesh(np.asarray(devices), ("data",))


def run(config, workdir, splits: Optional[Splits] = None) -> dict:
    """Run (or resume) every repeat of the experiment; returns the results dict.

    `splits` replaces loading `config.dataset` through TFDS (e.g. for timing runs)."""
    workdir = pathlib.Path(workdir)
    mesh = make_mesh(config.num_devices)
    validate_config(config, mesh.size)
    config_dict = json.loads(config.to_json())
    ckpt_lib.check_or_write_fingerprint(workdir, config_dict, write=False)
    upper_bound = None
    if config.upper_bound_results:
        path = pathlib.Path(config.upper_bound_results)
        if not path.exists():
            raise FileNotFoundError(f"upper_bound_results {path} does not exist; run "
                                    "--config.method=upper_bound first and pass its "
                                    "results.json")
        upper_bound = json.loads(path.read_text())
    splits = splits or load_splits(config)
    ckpt_lib.check_or_write_fingerprint(workdir, config_dict)  # written once the data loaded
    logging.info("devices: %s; dataset %s: %d train / %d test images", mesh.devices.tolist(),
                 config.dataset, len(splits.train_labels), len(splits.test_labels))
    title = f"{config.method} on {config.dataset}, {config.num_tasks} tasks"
    results = {}
    with metrics_lib.MetricWriter(workdir / "metrics.jsonl") as writer:
        run_results = []
        for repeat in range(config.repeats):
            runner = RepeatRunner(config, workdir, splits, mesh, writer, repeat)
            run_results.append(runner.run())
            runner.checkpointer.close()
            results = metrics_lib.build_results(run_results, upper_bound)
            metrics_lib.write_results(workdir, results, config_dict, title)
    agg = results["aggregate"]["final_accuracy"]
    logging.info("final accuracy A_N = %.2f +- %.2f %% over %d repeat(s); results in %s",
                 agg["mean"], agg["std"], agg["n"], workdir)
    return results
