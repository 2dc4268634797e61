"""The one host loop over a jitted chunk of steps, for every loop of a run: a task's training,
the generator's inversion, and the stages after a task (E2E's balanced fine-tuning, BiC's
bias correction, DGR's autoencoder).

`drive` calls the chunk until the loop's last step and, between calls: stops at a stop
request after saving (`preemption`), checks that the loss is finite (one message for every
loop, naming the last checkpoint that a rerun resumes from), logs the metric means of every
`log_every` steps with the time left, and saves a checkpoint every `save_every` steps. It
counts steps on the host (from the chunk's `active` mask), so it never reads the state's step
counter back from the device.

A stop may land between two log lines: the steps of the unfinished interval are saved with
the checkpoint (`pending`) and logged, with the steps after them, by the resumed run, so a
stopped and resumed loop writes the log of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

import numpy as np
from absl import logging

from abd_jax import logs, train


class Diverged(FloatingPointError):
    """A loop's loss became non-finite."""


@dataclasses.dataclass(frozen=True)
class DrivenLoop:
    """One loop for `drive`: `chunk(state, *args) -> (state, metrics)`, a jitted
    `train.fuse_steps` function (the state donated), run from step `start` to `total`. (An
    end-of-task stage that runs one is a `methods.lifecycle.Loop`.)"""

    name: str                # for the log: e.g. "task 2 training", "task 2 generator"
    chunk: Callable
    args: tuple
    start: int
    total: int
    steps_per_call: int
    items_per_step: int = 0  # images per step, for the throughput in the log (0: none)
    pending: Optional[dict] = None  # {metric: values} of steps since the last log line


@dataclasses.dataclass(frozen=True)
class Hooks:
    """What `drive` does between calls. log(step, means): the run's metric writer.
    save(state, step, pending) -> None: a checkpoint at this loop's `step` holding `pending`
    ({metric: values} of the steps not logged yet), every `save_every` steps (0: never) and
    when a stop is requested; None when the loop cannot be resumed part-way.
    setting: the rate to lower when the loss diverges (e.g. "lr", "synthesis.lr");
    recovery(setting) -> str: how to recover from there (where a rerun resumes)."""

    stop: Any
    log: Callable[[int, dict], None]
    log_every: int
    save: Optional[Callable[[Any, int, dict], None]] = None
    save_every: int = 0
    setting: str = "lr"
    recovery: Callable[[str], str] = lambda setting: f"Lower --config.{setting}."


def _means(pending: dict) -> dict:
    means = {k: float(np.mean(v)) for k, v in pending.items()}
    if "lr" in means:
        means["lr"] = float(pending["lr"][-1])  # the current rate, not the mean
    return means


def _left(done: int, total: int, warm_steps: int, warm_seconds: float) -> str:
    """The time left at the rate of the calls that compiled nothing ("estimating" before)."""
    if not warm_steps:
        return "estimating time left"
    return f"{logs.format_duration((total - done) * warm_seconds / warm_steps)} left"


def drive(loop: DrivenLoop, state, hooks: Hooks):
    """Run `loop` from `loop.start` to `loop.total` (see the module docstring). Returns (the
    final state, steps and seconds of the calls after the first, which may have compiled).
    Raises `Diverged` at a non-finite loss and `preemption.Preempted` after saving at a stop
    request."""
    done, last_saved = loop.start, loop.start
    pending = {k: list(v) for k, v in (loop.pending or {}).items()}
    warm_steps, warm_seconds, first_call = 0, 0.0, True

    def stop_if_requested():
        if hooks.stop.requested():
            if hooks.save is not None and done > last_saved:
                logging.warning("stop requested: saving a checkpoint at %s step %d",
                                loop.name, done)
                hooks.save(state, done, pending)
            hooks.stop.check()

    while done < loop.total:
        stop_if_requested()
        todo = min(hooks.log_every - done % hooks.log_every, loop.total - done)
        tic = time.time()
        state, metrics = train.run_steps(loop.chunk, state, todo, loop.steps_per_call,
                                         *loop.args, stop=hooks.stop)
        elapsed = time.time() - tic
        active = metrics.pop("active") > 0
        finite = np.isfinite(metrics["loss"][active])
        if not finite.all():
            bad = done + int(np.argmin(finite)) + 1
            raise Diverged(f"the loss of {loop.name} became non-finite at step {bad}: the run "
                           f"diverged. {hooks.recovery(hooks.setting)}")
        n = int(active.sum())
        done += n
        if not first_call:  # (the first call of a loop may include compilation)
            warm_steps, warm_seconds = warm_steps + n, warm_seconds + elapsed
        first_call = False
        for k, v in metrics.items():
            pending.setdefault(k, []).extend(float(x) for x in v[active])
        if done % hooks.log_every and done < loop.total:  # stopped inside an interval
            stop_if_requested()
            continue
        _log(loop, hooks, done, _means(pending), loop.items_per_step * n / max(elapsed, 1e-9),
             _left(done, loop.total, warm_steps, warm_seconds))
        pending = {}
        if (hooks.save is not None and hooks.save_every and done < loop.total
                and done - last_saved >= hooks.save_every):
            hooks.save(state, done, pending)
            last_saved = done
        if done < loop.total:
            stop_if_requested()
    return state, warm_steps, warm_seconds


def _log(loop: DrivenLoop, hooks: Hooks, step: int, means: dict, rate: float, left: str) -> None:
    hooks.log(step, {**means, **({"images_per_second": rate} if loop.items_per_step else {})})
    terms = " ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "lr")
    lr = f" lr {means['lr']:.4g}" if "lr" in means else ""
    speed = f" {rate:.0f} img/s," if loop.items_per_step else ""
    logging.info("%s %d/%d %s%s%s %s", loop.name, step, loop.total, terms, lr, speed, left)
