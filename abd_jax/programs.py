"""Jitted programs shared by value within a process.

`jax.jit(f)` caches its traces and executables on the function object `f`. A run that builds
fresh closures (its learner chunk, generator step, evaluation) therefore traces, lowers and
compiles again even when an earlier run in the same process (a table's rows, a sweep's
folds, a test suite) built the very same program. `jitted(build, *args)` keeps one
`jax.jit(build(*args))` per distinct `(build, args)`, compared by value, so those runs share
it; `bind` is the value-compared `functools.partial` that loss functions are built from,
and `shared` gives equal runs the same optimiser and apply function, the static fields of
their `TrainState`s (jit compares a pytree's static fields to reuse a trace).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from typing import Any, Callable

import jax

MAX_PROGRAMS = 64  # least recently used first out (each may hold compiled executables)

_programs: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()  # (compile-ahead threads ask for programs too)


@dataclasses.dataclass(frozen=True)
class Bound:
    """`fn(*args, **kwargs)` with `kwargs` fixed; unlike `functools.partial`, equal (and
    hashed) by value, so two runs' equal losses are one cache key."""

    fn: Callable
    kwargs: tuple  # sorted (name, value) pairs, each value hashable

    def __call__(self, *args):
        return self.fn(*args, **dict(self.kwargs))


@functools.lru_cache(maxsize=256)
def shared(factory: Callable, *args: Any) -> Any:
    """`factory(*args)`, made once per process for equal (hashable) `args`: e.g. an optax
    optimiser, whose functions compare by identity."""
    return factory(*args)


def bind(fn: Callable, **kwargs) -> Bound:
    """`functools.partial(fn, **kwargs)` compared by value (`kwargs` must be hashable)."""
    return Bound(fn, tuple(sorted(kwargs.items())))


def jitted(build: Callable[..., Callable], *args: Any, **jit_kwargs: Any) -> Callable:
    """`jax.jit(build(*args), **jit_kwargs)`, built once per process for equal `(build,
    args, jit_kwargs)` (all hashable by value: modules, meshes, frozen dataclasses, `Bound`
    losses, numbers, tuples)."""
    key = (build, args, tuple(sorted((k, _hashable(v)) for k, v in jit_kwargs.items())))
    with _lock:
        if key in _programs:
            _programs.move_to_end(key)
            return _programs[key]
        program = _programs[key] = jax.jit(build(*args), **jit_kwargs)
        if len(_programs) > MAX_PROGRAMS:
            _programs.popitem(last=False)
        return program


def _hashable(value):
    return tuple(sorted(value.items())) if isinstance(value, dict) else value


def clear() -> None:
    """Forget every shared program (the next run traces and compiles afresh)."""
    with _lock:
        _programs.clear()
