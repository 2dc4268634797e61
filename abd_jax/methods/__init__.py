"""Methods: each is a set of pure loss functions plus task-boundary behaviour, plugged into
the one shared task loop (`abd_jax.experiment`). `get_method(config)` builds one by name."""
from __future__ import annotations

import dataclasses
from typing import Callable

from abd_jax import train
from abd_jax.methods import lwf


@dataclasses.dataclass(frozen=True)
class Method:
    """name: config name. loss: the loss for tasks after the first (task 1 is always plain CE).
    uses_teacher: freeze the model at each task end and pass it to `loss`.
    retrain_on_all_seen: re-initialise at every task and train on all classes seen so far
    (the upper bound)."""

    name: str
    loss: train.LossFn
    uses_teacher: bool = False
    retrain_on_all_seen: bool = False


_FACTORIES: dict[str, Callable] = {
    "base": lambda c: Method("base", train.cross_entropy_loss),
    "upper_bound": lambda c: Method("upper_bound", train.cross_entropy_loss,
                                    retrain_on_all_seen=True),
    "lwf": lambda c: Method("lwf", lwf.make_lwf_loss(c.lwf_mu, c.kd_temperature),
                            uses_teacher=True),
    "lwf_mc": lambda c: Method("lwf_mc", lwf.lwf_mc, uses_teacher=True),
}

METHODS = tuple(_FACTORIES)


def get_method(config) -> Method:
    if config.method not in _FACTORIES:
        raise ValueError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)} "
                         "(e.g. --config.method=lwf)")
    return _FACTORIES[config.method](config)


__all__ = ["Method", "METHODS", "get_method"]
