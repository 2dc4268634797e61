"""What the runs of one process share while their caller keeps them together.

`jax.jit(f)` keeps its traces and executables on the function object `f`, and jit compares a
pytree's static fields (a TrainState's optimiser and apply function) to reuse a trace. Runs
that build fresh closures and optimisers would therefore trace, lower and compile the same
programs again. A `Session` holds, for as long as its owner keeps it:

- `jitted(build, *args)`: one `jax.jit(build(*args))` per distinct `(build, args)`, compared by
  value (modules, meshes, frozen dataclasses, `bind` losses, numbers, tuples);
- `shared(factory, *args)`: one `factory(*args)` per distinct args (optax optimisers, whose
  functions compare by identity, and modules' apply functions);
- `labels`: the labels read from a split's files, per version of those files;
- `pool(threads)`: the thread pool that decodes images;
- `stop`: the run's stop requests (SIGTERM, Ctrl-C; `preemption.StopRequests`).

`main` makes one per command; a table, a sweep or a test module passes one session to every
run, so that they compile each program once. Nothing here is module-level state.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
from typing import Any, Callable

import jax

from abd_jax import preemption


@dataclasses.dataclass(frozen=True)
class Bound:
    """`fn(*args, **kwargs)` with `kwargs` fixed; unlike `functools.partial`, equal (and
    hashed) by value, so two runs' equal losses are one program's key."""

    fn: Callable
    kwargs: tuple  # sorted (name, value) pairs, each value hashable

    def __call__(self, *args):
        return self.fn(*args, **dict(self.kwargs))


def bind(fn: Callable, **kwargs) -> Bound:
    """`functools.partial(fn, **kwargs)` compared by value (`kwargs` must be hashable)."""
    return Bound(fn, tuple(sorted(kwargs.items())))


def _hashable(value):
    return tuple(sorted(value.items())) if isinstance(value, dict) else value


class Session:
    """See the module docstring. Use as a context manager, or call `close()`."""

    def __init__(self, max_programs: int = 64):
        self.max_programs = max_programs  # least recently used first out
        self._programs: collections.OrderedDict = collections.OrderedDict()
        self._shared: dict = {}
        self._pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
        self._lock = threading.RLock()  # (compile-ahead threads ask for programs too)
        self.labels: dict[tuple, Any] = {}
        self.stop = preemption.StopRequests()

    def jitted(self, build: Callable[..., Callable], *args: Any, **jit_kwargs: Any) -> Callable:
        """`jax.jit(build(*args), **jit_kwargs)`, built once for equal `(build, args,
        jit_kwargs)` (all hashable by value)."""
        key = (build, args, tuple(sorted((k, _hashable(v)) for k, v in jit_kwargs.items())))
        with self._lock:
            if key in self._programs:
                self._programs.move_to_end(key)
                return self._programs[key]
            program = self._programs[key] = jax.jit(build(*args), **jit_kwargs)
            if len(self._programs) > self.max_programs:
                self._programs.popitem(last=False)
            return program

    def shared(self, factory: Callable, *args: Any) -> Any:
        """`factory(*args)`, made once for equal (hashable) `args`."""
        key = (factory, args)
        with self._lock:
            if key not in self._shared:
                self._shared[key] = factory(*args)
            return self._shared[key]

    def pool(self, threads: int) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if threads not in self._pools:
                self._pools[threads] = concurrent.futures.ThreadPoolExecutor(
                    threads, thread_name_prefix="read_images")
            return self._pools[threads]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=False)
        self._pools.clear()
        self._programs.clear()
        self._shared.clear()
        self.labels.clear()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
