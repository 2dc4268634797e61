"""One repeat's data, model and compiled programs on the mesh, and the `lifecycle.Services`
a method's hooks call: a fresh learner, predictions on training images, driven SGD loops on
augmented batches, the metric writer and sample grids. The task loop that calls the method's
hooks, with its checkpoints and accuracy records, is `runner.RepeatRunner`.
"""
from __future__ import annotations

import pathlib

import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from abd_jax import data as data_lib
from abd_jax import augment, driver, evaluation, hosts, input_pipeline, plan, reporting, rng
from abd_jax import train
from abd_jax.methods import lifecycle
from abd_jax.sampling import DeviceData


class RepeatServices:
    """Repeat `repeat`'s plan (class order, keys), model, normalisation, training split on the
    mesh (or its stream), prediction program and learner optimiser; `rt`, what the method's
    hooks see of them; and the hooks' `lifecycle.Services`."""

    def __init__(self, config, workdir: pathlib.Path, splits, mesh: Mesh, writer, repeat: int,
                 method: lifecycle.Method, session):
        self.config, self.splits, self.mesh, self.writer = config, splits, mesh, writer
        self.workdir, self.repeat, self.method, self.session = workdir, repeat, method, session
        self.spec = spec = data_lib.classes_in_use(splits.spec, config.num_classes)
        self.plan = plan.RunPlan.create(config, splits.spec.num_classes, splits.train_labels,
                                        splits.test_labels, repeat)
        self.model = method.classifier(spec.num_classes)
        self.replicated = NamedSharding(mesh, P())
        self.mean, self.std = method.input_stats(spec)
        self.step_config = train.StepConfig(
            batch_size=config.batch_size, lr_decay=config.lr_decay,
            augment=augment.AugmentConfig(**config.augment.to_dict()),
            mean=self.mean, std=self.std)
        self.steps_per_call = config.steps_per_call or train.default_steps_per_call()
        if splits.streamed and not config.steps_per_call:  # one call's batches travel at once
            self.steps_per_call = input_pipeline.steps_per_call_for(
                self.steps_per_call, config.batch_size, spec.image_shape)
        self.data = None  # the training split on the mesh (device path)
        if not splits.streamed:
            self.data = DeviceData(*hosts.to_global(
                (splits.train_images, self.plan.train_labels.astype(np.int32)),
                self.replicated))
        self.predict = evaluation.make_predict(session, self.model, self.mean, self.std, mesh)
        self.rt = lifecycle.Runtime(
            config=config, plan=self.plan, model=self.model, mesh=mesh,
            image_shape=spec.image_shape, steps_per_call=self.steps_per_call,
            method_key=self.plan.method_key, session=session, services=self)
        self.capacity = plan.shared_capacity(method.index_capacity(self.rt))
        self.tx = train.learner_optimizer(session, config.lr, config.momentum,
                                          method.weight_decay(config))

    def learner(self, key) -> train.TrainState:
        """A new learner from `key`, placed on the mesh."""
        return self.placed(lifecycle.new_learner(self.rt, self.method, key, self.tx))

    def placed(self, tree):
        """`tree` replicated on the mesh, as every jitted step returns its outputs: inputs
        placed otherwise (a fresh optimiser state on the default device) would make the next
        call compile again."""
        return hosts.to_global(tree, self.replicated)

    def feed(self, host_info, start: int):
        """A loop's data argument for steps `[start, total)`: the split on the mesh, or a
        grain feed of host-read batches (`input_pipeline`)."""
        if self.data is not None:
            return self.data
        c = self.config
        return input_pipeline.StreamFeed(
            self.splits.train_images.source, self.splits.spec, self.plan.train_labels,
            host_info, start, c.batch_size, self.steps_per_call, self.mesh, c.stream_workers,
            c.stream_prefetch, input_pipeline.train_transform(self.splits.spec), self.session)

    # ------------------------------------------------------------------ lifecycle.Services
    def fresh_learner(self, t: int) -> train.TrainState:
        return self.learner(rng.fold_in(self.plan.init_key, t))

    def train_images(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(self.splits.train_images[index])

    def predict_train(self, learner, index: np.ndarray):
        return evaluation.predict_all(self.predict, learner, self.splits.train_images[index],
                                      self.config.eval_batch_size, self.mesh,
                                      self.session.stop)

    def sgd_loop(self, name, loss_fn, inputs, index, schedule, key, task, start):
        c = self.config
        host_info = self.plan.task_info(task, index, schedule, key, self.capacity)
        info = hosts.to_global(host_info, self.replicated)
        chunk = train.train_chunk(self.session, self.model, loss_fn, self.step_config,
                                  self.mesh, self.steps_per_call)
        total = int(host_info.total_steps)
        logging.info("repeat %d task %d %s: %d images, %d steps (%d epochs) at lr %g",
                     self.repeat, task.index + 1, name, len(index), total, schedule.epochs,
                     schedule.lr)
        return driver.DrivenLoop(f"task {task.index + 1} {name}", chunk,
                                 (self.placed(inputs), self.feed(host_info, start), info),
                                 start, total, self.steps_per_call, c.batch_size)

    def log(self, step, scalars, **tags) -> None:
        self.writer.write(step, scalars, repeat=self.repeat, **tags)

    def save_samples(self, t: int, images, labels, title: str) -> None:
        if not hosts.is_main():
            return
        path = self.workdir / f"samples_repeat{self.repeat}_task{t + 1}.png"
        reporting.save_sample_grid(path, images, self.plan.order[labels], self.mean, self.std,
                                   title=title)
