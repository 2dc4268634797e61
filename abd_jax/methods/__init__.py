"""Methods: each is its losses plus task-boundary hooks with its own typed state (see
`lifecycle`), plugged into the one shared task loop (`abd_jax.runner`).
`get_method(config, spec)` builds one by name."""
from __future__ import annotations

from typing import Optional

from abd_jax import data as data_lib

from abd_jax.methods.abd import ABD
from abd_jax.methods.base import Base, UpperBound
from abd_jax.methods.bic import BiC
from abd_jax.methods.coreset import LwFCoreset, NaiveRehearsal
from abd_jax.methods.deepinversion import DeepInversion
from abd_jax.methods.dgr import DGR
from abd_jax.methods.e2e import E2E
from abd_jax.methods.lifecycle import Loop, Method, Runtime, SGDLoop, Update
from abd_jax.methods.lwf import LwF, LwFMC, LwFSynthetic
from abd_jax.methods.rdfcil import RDFCIL
from abd_jax.plan import Task

_CLASSES: dict[str, type] = {cls.name: cls for cls in (
    ABD, DeepInversion, LwFSynthetic, Base, UpperBound, LwF, LwFMC, NaiveRehearsal, LwFCoreset,
    E2E, BiC, DGR, RDFCIL)}

METHODS = tuple(_CLASSES)


def get_method(config, spec: Optional[data_lib.DatasetSpec] = None) -> Method:
    """The method `config.method` for data described by `spec` (default: the registered
    `config.dataset`'s)."""
    if config.method not in _CLASSES:
        raise ValueError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)} "
                         "(e.g. --config.method=lwf)")
    return _CLASSES[config.method](config, spec or data_lib.spec_of(config))


__all__ = ["Loop", "Method", "METHODS", "Runtime", "SGDLoop", "Task", "Update", "get_method"]
