"""Methods: each is a set of pure loss functions plus task-boundary behaviour, plugged into
the one shared task loop (`abd_jax.experiment`). `get_method(config, image_shape)` builds one
by name."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import flax.linen as nn

from abd_jax import models, synthesis, train
from abd_jax.methods import abd, deepinversion, lwf


@dataclasses.dataclass(frozen=True)
class Method:
    """name: config name. loss: the loss for tasks after the first (task 1 is always plain CE).
    uses_teacher: freeze the model at each task end and pass it to `loss`.
    retrain_on_all_seen: re-initialise at every task and train on all classes seen so far
    (the upper bound).
    synthesis / generator: for synthetic-replay methods, the generator trained by model
    inversion after each task and sampled inside `loss` (via `ctx.frozen.extra`)."""

    name: str
    loss: train.LossFn
    uses_teacher: bool = False
    retrain_on_all_seen: bool = False
    synthesis: Optional[synthesis.SynthesisConfig] = None
    generator: Optional[nn.Module] = None


def _synthesis_config(config) -> synthesis.SynthesisConfig:
    fields = config.synthesis.to_dict()
    fields["batch_size"] = fields["batch_size"] or config.batch_size
    return synthesis.SynthesisConfig(**fields)


def _replay_method(name: str, config, image_shape, make_loss: Callable) -> Method:
    cfg = _synthesis_config(config)
    height, _, channels = image_shape
    generator = models.create_generator(height, channels, cfg.z_dim, cfg.inner_bn_eps)
    loss = functools.partial(make_loss, generator=generator, z_dim=cfg.z_dim)
    return Method(name, loss, uses_teacher=True, synthesis=cfg, generator=generator)


_FACTORIES: dict[str, Callable] = {
    "base": lambda c, shape: Method("base", train.cross_entropy_loss),
    "upper_bound": lambda c, shape: Method("upper_bound", train.cross_entropy_loss,
                                           retrain_on_all_seen=True),
    "lwf": lambda c, shape: Method("lwf", lwf.make_lwf_loss(c.lwf_mu, c.kd_temperature),
                                   uses_teacher=True),
    "lwf_mc": lambda c, shape: Method("lwf_mc", lwf.lwf_mc, uses_teacher=True),
    "abd": lambda c, shape: _replay_method(
        "abd", c, shape, functools.partial(abd.abd, opts=abd.AbdOptions(**c.abd.to_dict()))),
    "deepinversion": lambda c, shape: _replay_method(
        "deepinversion", c, shape, functools.partial(
            deepinversion.deepinversion, mu=c.deepinversion_mu, temperature=c.kd_temperature)),
    "lwf_synthetic": lambda c, shape: _replay_method(
        "lwf_synthetic", c, shape, functools.partial(
            lwf.lwf_synthetic, mu=c.lwf_synthetic_mu, temperature=c.kd_temperature)),
}

METHODS = tuple(_FACTORIES)


def get_method(config, image_shape=(32, 32, 3)) -> Method:
    if config.method not in _FACTORIES:
        raise ValueError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)} "
                         "(e.g. --config.method=lwf)")
    return _FACTORIES[config.method](config, tuple(image_shape))


__all__ = ["Method", "METHODS", "get_method"]
