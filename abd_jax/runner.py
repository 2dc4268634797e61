"""One repeat of the class-incremental task loop, shared by every method (it names none).

    for each task t: begin_task; the driven SGD loop of the method's loss (checkpointed every
                     `checkpoint_every_steps`); the method's end-of-task stages (`Update`s,
                     driven `Loop`s); evaluation on every task seen; a checkpoint.

Every loop runs through `driver.drive`. A checkpoint's position names its phase (training
step, end-of-task stage and step, evaluation pending), so an interrupt anywhere resumes from
the newest checkpoint and reproduces the uninterrupted numbers (all randomness is
`fold_in(key, step)` of the plan's keys).
"""
from __future__ import annotations

import dataclasses
import pathlib
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from abd_jax import ahead as ahead_lib
from abd_jax import checkpoint as ckpt_lib
from abd_jax import driver, evaluation, first_task, hosts, logs, metrics, plan, reporting
from abd_jax import services, train
from abd_jax.methods import lifecycle


def peak_memory_bytes() -> int:
    """Peak device memory where the backend reports it (GPU/TPU), else the host's max RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class RepeatRunner:
    """One repeat's task loop: it calls the method's hooks without knowing which method it is,
    on the repeat's `services.RepeatServices` (plan, model, data, programs), and keeps the
    checkpoints, the accuracy records and the timings."""

    def __init__(self, config, workdir: pathlib.Path, splits, mesh: Mesh, writer, repeat: int,
                 method: lifecycle.Method, session):
        self.config, self.splits, self.mesh, self.repeat = config, splits, mesh, repeat
        self.workdir, self.method, self.session = workdir, method, session
        self.services = services.RepeatServices(config, workdir, splits, mesh, writer, repeat,
                                                method, session)
        self.plan, self.rt = self.services.plan, self.services.rt
        self.writer = writer
        self.checkpointer = ckpt_lib.RunCheckpointer(
            workdir / "checkpoints" / f"repeat_{repeat}", config.keep_task_checkpoints)
        self.acc = metrics.AccuracyMatrix(config.num_tasks)
        self.timing = {"train_seconds": 0.0, "train_steps": 0, "task_wall_seconds": []}
        self.compiled_ahead: dict[str, str] = {}  # program -> outcome (config.compile_ahead)
        self.restored_result = False  # the repeat was already complete in the workdir
        self.pending: dict = {}  # a resumed loop's metrics not logged yet (`driver`)

    # ------------------------------------------------------------------ helpers
    def _drive(self, loop: driver.DrivenLoop, state, hooks: driver.Hooks):
        """`driver.drive`, the first loop after a resume continuing its unlogged metrics."""
        loop = dataclasses.replace(loop, pending=self.pending)
        self.pending = {}
        return driver.drive(loop, state, hooks)

    def _save(self, task: int, step: int, learner, method_state, result=None,
              pending=None) -> None:
        """Checkpoint position (task, step) (see `checkpoint`) with the accuracy records,
        timings, the metrics log's length so far and the loop's metrics not logged yet."""
        meta = {"accuracy": self.acc.to_dict(), "timing": self.timing, "result": result,
                "metrics_bytes": self.writer.tell(), "pending_metrics": pending or {}}
        self.checkpointer.save(task, step, {"state": learner, "method": method_state}, meta)

    def _recovery(self, setting: str) -> str:
        """How to recover from a divergence: lower `setting`, resuming from the newest
        checkpoint (taken before it) when there is one."""
        position = self.checkpointer.latest()
        if position is None:
            return (f"No checkpoint was saved before it: lower --config.{setting} and rerun "
                    f"with a new --workdir, or in this one adding --allow_changed={setting}.")
        return (f"Lower --config.{setting} and rerun the same command adding "
                f"--allow_changed={setting}: it resumes from the newest checkpoint "
                f"({ckpt_lib.describe_position(*position)}, in {self.checkpointer.directory}), "
                "taken before the divergence. Or start anew with another --workdir.")

    def _hooks(self, task, log_every: int, save_every: int, save, setting: str,
               phase: str | None) -> driver.Hooks:
        tags = {"task": task.index + 1, **({"phase": phase} if phase else {})}
        return driver.Hooks(stop=self.session.stop, log=lambda step, m: self.services.log(step, m, **tags),
                            log_every=log_every, save=save, save_every=save_every,
                            setting=setting, recovery=self._recovery)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        c = self.config
        learner = self.services.learner(self.plan.init_key)
        method_state = self.services.placed(self.method.init_state(self.rt, learner))
        start_task, start_step = 0, 0
        latest = self.checkpointer.restore_latest({"state": learner, "method": method_state})
        if latest is None:
            if self.repeat == c.first_repeat:
                self.writer.truncate(0)  # lines of a run killed before its first checkpoint
        else:
            (start_task, start_step), restored, meta = latest
            if "metrics_bytes" in meta:  # drop lines logged after that checkpoint
                self.writer.truncate(meta["metrics_bytes"])
            if meta.get("result") is not None:
                logging.info("repeat %d already complete in the workdir", self.repeat)
                self.restored_result = True
                return meta["result"]
            learner, method_state = restored["state"], restored["method"]
            self.acc = metrics.AccuracyMatrix.from_dict(meta["accuracy"])
            self.timing = meta["timing"]
            self.pending = meta.get("pending_metrics") or {}
            logging.info("resuming repeat %d at %s", self.repeat,
                         ckpt_lib.describe_position(start_task, start_step))
        ahead = self._start_ahead(learner, method_state, start_task) if c.compile_ahead else None
        try:
            for t in range(start_task, c.num_tasks):
                step = start_step if t == start_task else 0
                learner, method_state = self._task(self.plan.task(t), step, learner,
                                                   method_state)
        finally:  # (also when stopped: no compiling thread outlives the run)
            if ahead is not None:
                self.compiled_ahead = ahead.join()
                logging.info("compiled ahead: %s", self.compiled_ahead)
        return self._result(method_state)

    def _task(self, task: plan.Task, step: int, learner, method_state):
        """Task `task` from checkpoint position `step` to its end (saved as (t + 1, 0))."""
        t, tic = task.index, time.time()
        if step < ckpt_lib.END_TASK:
            if step == 0:
                learner, method_state = self.services.placed(self.method.begin_task(
                    self.rt, learner, method_state, task))
            if task.is_first and self.config.get("first_task_from"):
                learner = self.services.placed(first_task.load(self.config.first_task_from,
                                                       self.repeat, learner))
            elif self.method.trains(task):
                learner = self._train(task, step, learner, method_state)
            if task.is_first and self.method.keeps_first_task:
                first_task.save(self.workdir, self.repeat, learner)
            # The end-of-task stages may be long (synthesis): don't redo training after them.
            self._save(t, ckpt_lib.stage_step(0, 0), learner, method_state)
        if step < ckpt_lib.EVALUATE:
            learner, method_state = self._end_task(task, max(step, ckpt_lib.END_TASK), learner,
                                                   method_state)
            self._save(t, ckpt_lib.EVALUATE, learner, method_state)
        self._evaluate(task, learner, method_state)
        self.timing["task_wall_seconds"].append(time.time() - tic)
        self._log_time_left(t)
        result = self._result(method_state) if task.is_last else None
        self._save(t + 1, 0, learner, method_state, result)
        return learner, method_state

    def _train(self, task, step: int, learner, method_state):
        """The task's driven SGD loop from `step`."""
        c = self.config
        index = self.method.train_index(self.rt, method_state, task)
        lo, hi = task.num_old, task.num_seen
        ids = self.plan.order[lo:hi].tolist()
        logging.info("repeat %d task %d/%d: classes %s (dataset ids), %d images", self.repeat,
                     task.index + 1, c.num_tasks, ids if len(ids) <= 20 else
                     f"{ids[:20]} and {len(ids) - 20} more", len(index))
        loop = self.services.sgd_loop("training", self.method.loss_fn(task), method_state, index,
                             self.method.schedule(c, task), self.plan.task_key(task.index), task,
                             step)
        save = lambda state, k, pending: self._save(task.index, k, state, method_state,
                                                     pending=pending)
        hooks = self._hooks(task, c.log_every_steps, c.checkpoint_every_steps, save, "lr", None)
        learner, warm_steps, warm_seconds = self._drive(loop, learner, hooks)
        self.timing["train_seconds"] += warm_seconds
        self.timing["train_steps"] += warm_steps
        return learner

    def _end_task(self, task, step: int, learner, state):
        """The method's end-of-task stages from position `step` (>= END_TASK)."""
        stages = self.method.end_task(task)
        first, progress = ckpt_lib.stage_of(step)
        for i in range(first, len(stages)):
            stage = stages[i]
            if isinstance(stage, lifecycle.Update):
                learner, state = self.services.placed(stage.fn(self.rt, learner, state, task))
                continue
            resumed = i == first and progress > 0
            learner, state = self._loop(task, i, stage, learner, state,
                                        progress if resumed else None)
            if i + 1 < len(stages):
                self._save(task.index, ckpt_lib.stage_step(i + 1, 0), learner, state)
        return learner, state

    def _loop(self, task, i: int, stage: lifecycle.Loop, learner, state, resume_at):
        """End-of-task stage `i`, a driven loop, from its start or from step `resume_at`."""
        if resume_at is None:
            learner, state = self.services.placed(stage.begin(self.rt, learner, state, task))
        loop = stage.program(self.rt, learner, state, task, resume_at or 0)
        if loop is not None:
            save = lambda trained, k, pending: self._save(
                task.index, ckpt_lib.stage_step(i, k), *stage.put(learner, state, trained),
                pending=pending)
            hooks = self._hooks(task, stage.log_every(self.config),
                                stage.checkpoint_every(self.config), save, stage.setting,
                                stage.name)
            trained, _, _ = self._drive(loop, stage.get(learner, state), hooks)
            learner, state = stage.put(learner, state, trained)
        return self.services.placed(stage.end(self.rt, learner, state, task))

    def _evaluate(self, task, learner, method_state) -> None:
        t = task.index
        seen = self.plan.test_labels < task.num_seen
        logits, features = evaluation.predict_all(
            self.services.predict, learner, self.splits.test_images[seen], self.config.eval_batch_size,
            self.mesh, self.session.stop)
        logits = self.method.eval_logits(self.rt, method_state, logits, features, task)
        for j, (g, l, top5) in enumerate(evaluation.task_accuracies(
                logits, self.plan.test_labels[seen], self.plan.bounds, t)):
            self.acc.record(t, j, g, l, top5)
        row = self.acc.global_acc[t, :t + 1]
        a_inc = metrics.average_incremental_accuracy(self.acc.global_acc[:t + 1, :t + 1])
        logging.info("after task %d: accuracy per task %s, A_%d = %.2f%%, A_inc = %.2f%%",
                     t + 1, np.round(row, 2).tolist(), t + 1, float(np.mean(row)), a_inc)
        self.services.log(t + 1, {"A": float(np.mean(row)), "A_inc": a_inc}, eval=1)

    def _log_time_left(self, t: int) -> None:
        """A rough estimate: the mean wall time of this repeat's tasks so far."""
        c = self.config
        walls = self.timing["task_wall_seconds"]
        repeats_left = c.first_repeat + c.repeats - self.repeat - 1
        tasks_left = (c.num_tasks - t - 1) + repeats_left * c.num_tasks
        left = (f"; roughly {logs.format_duration(tasks_left * float(np.mean(walls)))} left "
                f"({tasks_left} tasks)" if tasks_left else "")
        logging.info("task %d took %s%s", t + 1, logs.format_duration(walls[-1]), left)

    def _result(self, method_state) -> dict:
        steps = self.timing["train_steps"]  # (none when every loop was one call)
        footprint = self.method.memory_footprint(self.rt, method_state)
        return {"seed": self.plan.seed, "class_order": self.plan.order.tolist(),
                **self.acc.to_dict(),
                "train_seconds_per_batch": (self.timing["train_seconds"] / steps
                                            if steps else None),
                "task_wall_seconds": list(self.timing["task_wall_seconds"]),
                "peak_memory_bytes": peak_memory_bytes(),
                "memory": {**footprint, **metrics.memory_totals(footprint)}}

    def _start_ahead(self, learner, method_state, start_task: int) -> ahead_lib.Ahead:
        """Compile in background threads what the run calls after its first task (evaluation,
        the method's own programs, later tasks' learner chunks) and load the plotting fonts
        (see `abd_jax.ahead`)."""
        c, s = self.config, self.services
        batch = evaluation.eval_batch_size(c.eval_batch_size, self.mesh.size)
        images = jax.ShapeDtypeStruct((batch, *s.spec.image_shape), jnp.uint8,
                                      sharding=NamedSharding(self.mesh, P("data")))
        programs = [("evaluation", s.predict, (learner.params, learner.batch_stats, images))]
        programs += self.method.programs(self.rt, learner, method_state)
        first_use = {self.method.loss_fn(self.plan.task(start_task)): start_task}
        for t in range(start_task + 1, c.num_tasks):
            first_use.setdefault(self.method.loss_fn(self.plan.task(t)), t)
        if s.data is not None:  # (streamed batches' shapes are the feed's business)
            info = self.services.placed(self.plan.task_info(
                self.plan.task(start_task), np.zeros(c.batch_size, np.int32),
                plan.Schedule(1, c.lr), self.plan.run_key, s.capacity))
            programs += [(f"learner chunk of task {t + 1}",
                          train.train_chunk(self.session, s.model, loss, s.step_config,
                                            self.mesh, s.steps_per_call),
                          (learner, method_state, s.data, info))
                         for loss, t in first_use.items() if t > start_task]
        jobs = ahead_lib.compile_jobs(programs)
        if hosts.is_main():
            jobs.append(("plotting fonts", reporting.load_plotting))
        return ahead_lib.Ahead(jobs)
