"""PRNG keys and host-side random draws, with explicit transfers only.

Eager `jax.random.PRNGKey(3)` or `fold_in(key, 3)` move their Python integers to the device
implicitly; the run's host code derives its keys here instead (jitted, inputs placed with
`device_put`, results fetched with `device_get`), so that a whole run passes under
`jax.transfer_guard("disallow")`. Keys are raw uint32 `[2]` numpy arrays, which every
`jax.random` function accepts; values are those of the eager calls.
"""
from __future__ import annotations

import functools

import jax
import numpy as np


@jax.jit
def _seed(seed):
    return jax.random.PRNGKey(seed)


@jax.jit
def _fold_in(key, data):
    return jax.random.fold_in(key, data)


@functools.partial(jax.jit, static_argnums=1)
def _split(key, num: int):
    return jax.random.split(key, num)


@functools.partial(jax.jit, static_argnums=1)
def _permutation(key, n: int):
    return jax.random.permutation(key, n)


@functools.partial(jax.jit, static_argnums=1)
def _randint(key, shape: tuple, high):
    return jax.random.randint(key, shape, 0, high)


def key(seed: int) -> np.ndarray:
    """`jax.random.PRNGKey(seed)` (uint32 `[2]`, on the host)."""
    return np.asarray(jax.device_get(_seed(jax.device_put(np.int32(seed)))))


def fold_in(key_, data: int) -> np.ndarray:
    """`jax.random.fold_in(key, data)` (on the host)."""
    return np.asarray(jax.device_get(_fold_in(jax.device_put(key_),
                                              jax.device_put(np.uint32(data)))))


def split(key_, num: int) -> np.ndarray:
    """`jax.random.split(key, num)` (`[num, 2]`, on the host)."""
    return np.asarray(jax.device_get(_split(jax.device_put(key_), num)))


def permutation(key_: jax.Array, n: int) -> np.ndarray:
    """`jax.random.permutation(key, n)` on the host."""
    return np.asarray(jax.device_get(_permutation(jax.device_put(key_), n)))


def randint(key_: jax.Array, count: int, high: int) -> np.ndarray:
    """`jax.random.randint(key, (count,), 0, high)` on the host."""
    return np.asarray(jax.device_get(_randint(jax.device_put(key_), (count,),
                                              jax.device_put(np.int32(high)))))


def linear_init(key_, fan_in: int, shape: tuple) -> np.ndarray:
    """float64 `shape` from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default `Linear`
    initialisation, drawn on the host by NumPy seeded with `key_`."""
    bound = 1.0 / np.sqrt(fan_in)
    return np.random.default_rng(np.asarray(key_).tolist()).uniform(-bound, bound, shape)
