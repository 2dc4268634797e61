"""Compile a run's later programs in background threads (`--config.compile_ahead`).

A run calls its first task's training chunk at once, but the programs of later stages
(evaluation, the method's own end-of-task steps such as the generator's, the next tasks'
learner chunk) only minutes later, and compiles each when first called. Lowering and
compiling them ahead (`jitted.lower(*args).compile()` fills the same cache that the later call
looks up) overlaps their compilation with the first task's training. XLA compiles without
holding Python's GIL, so this needs idle CPU cores: useful next to a GPU/TPU, not on a 2-core
CPU that is busy training.

A program whose ahead-of-time arguments do not match the later call (a different shape,
dtype, weak type or sharding) is simply compiled again when called: results never depend on
this, only the time to reach them.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

import jax
from absl import logging


def abstract(tree):
    """`tree` with every array replaced by a `jax.ShapeDtypeStruct` of the same shape, dtype,
    weak type and (committed) sharding; other leaves (Python scalars) kept."""
    def leaf(x):
        if not isinstance(x, jax.Array):
            return x
        sharding = x.sharding if getattr(x, "committed", True) else None
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding,
                                    weak_type=x.weak_type)

    return jax.tree.map(leaf, tree)


class Ahead:
    """Background threads, one per job; `outcome[name]` is "ready in N s" or the error."""

    def __init__(self, jobs: Sequence[tuple[str, Callable[[], Any]]]):
        self.outcome: dict[str, str] = {}
        self._threads = [threading.Thread(target=self._run, args=(name, job), daemon=True,
                                          name=f"ahead:{name}") for name, job in jobs]
        for thread in self._threads:
            thread.start()

    def _run(self, name: str, job: Callable[[], Any]) -> None:
        tic = time.time()
        try:
            job()
            self.outcome[name] = f"ready in {time.time() - tic:.1f} s"
        except Exception as err:  # noqa: BLE001 (the later call compiles it as usual)
            self.outcome[name] = f"failed: {type(err).__name__}: {err}"
            logging.warning("compiling %s ahead failed; it compiles when first called: %s",
                            name, err)

    def join(self) -> dict[str, str]:
        for thread in self._threads:
            thread.join()
        return dict(self.outcome)


def compile_jobs(programs: Sequence[tuple[str, Callable, tuple]]):
    """[(name, job)] that lower and compile each `(name, jitted_fn, example_args)`; the
    arguments are made abstract now (in the calling thread), so the jobs hold no buffers."""
    jobs = []
    for name, fn, args in programs:
        shapes = abstract(args)
        jobs.append((name, lambda fn=fn, shapes=shapes: fn.lower(*shapes).compile()))
    return jobs
