"""Shared test helpers (importable as `helpers`: pytest puts tests/ on sys.path)."""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from abd_jax import models
from configs import digits

# Compiling is most of the suite's time: XLA:CPU's loop emitters and LLVM's -O1 compile the
# tiny test programs faster than the defaults and run them as fast (docs/testing.md). -O0
# compiles faster still but runs steps several times slower: only for scripts that run a
# step or two (experiments/benchmark.py).
XLA_TEST_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int = 0, llvm_opt_level: int = 1) -> str:
    """XLA_FLAGS for the tests and their subprocesses: `devices` host devices (0: the
    platform's one), `XLA_TEST_FLAGS` and LLVM's optimisation level."""
    count = f"--xla_force_host_platform_device_count={devices} " if devices else ""
    return f"{count}{XLA_TEST_FLAGS} --xla_backend_optimization_level={llvm_opt_level}"


def tiny_config(data_dir, **overrides):
    """The digits config on a schedule of seconds: 2 epochs, 20 generator iterations, one
    device (faster on 2 cores than 4 simulated ones; tests about data parallelism pass
    `num_devices=0` for all 4), checkpoints only where a stage ends (tests about periodic
    checkpoints set `checkpoint_every_steps` and `synthesis.checkpoint_every` themselves)."""
    c = digits.get_config()
    c.data_dir = data_dir
    c.num_devices = 1
    c.epochs = 2
    c.log_every_steps = 4
    c.checkpoint_every_steps = 10_000
    c.synthesis.iterations = 20
    c.synthesis.log_every = 10
    c.synthesis.checkpoint_every = 10_000
    c.synthesis.sample_grid_size = 4
    for k, v in overrides.items():
        c[k] = v
    return c


def three_task_config(data_dir, method):
    """`tiny_config` with 3 tasks of the first 6 classes and 1 epoch: an end-of-task stage
    after task 2 and one after the last task. Shared by the tests of the replay methods (whole
    runs, interrupted ones and their `reference_run`)."""
    return tiny_config(data_dir, method=method, epochs=1, num_tasks=3, num_classes=6)


class TinyNet(nn.Module):
    """A minimal classifier with the project's contract: (logits, features `[n, 5]`), head
    "head", one BatchNorm (train and eval modes differ; train mode takes statistics over the
    whole batch)."""

    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Dense(5, name="body")(x.reshape(x.shape[0], -1))
        f = jnp.tanh(models.BatchNorm(use_running_average=not train, name="bn")(h))
        return nn.Dense(self.num_classes, name="head")(f), f


class TinyGenerator(nn.Module):
    """A minimal generator with the project's contract: z `[n, z_dim]` -> normalised images
    `[n, 4, 4, 1]`, eval mode (train=False) on running statistics."""

    @nn.compact
    def __call__(self, z, train: bool = True):
        x = jnp.tanh(nn.Dense(16, name="fc")(z)).reshape(z.shape[0], 4, 4, 1)
        return nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                            name="bn_out")(x)


def log_softmax64(z):
    """float64 reference: [..., C] log softmax over the last axis."""
    z = np.asarray(z, np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def ce64(z, y):
    """float64 reference: [B] -log softmax(z_i)_{y_i}."""
    return -log_softmax64(z)[np.arange(len(y)), np.asarray(y)]
