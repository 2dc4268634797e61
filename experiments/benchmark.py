"""Time the jitted training steps on the available backend.

    python experiments/benchmark.py [--steps=50] [--batch_size=128] [--model=resnet32]

Prints ms per training step and images/s for each step kind, with the device name. Uses
random CIFAR-shaped data (no dataset needed), the real train step (augmentation, batching,
optimiser update, data parallelism over all local devices) and ResNet-32 by default.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from abd_jax import data as data_lib  # noqa: E402
from abd_jax import experiment, models, train  # noqa: E402
from abd_jax.methods import lwf  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 50, "Timed steps per measurement.")
flags.DEFINE_integer("steps_per_call", 0, "Steps per jitted call (0 = auto: 1 on CPU, 50 else).")
flags.DEFINE_integer("repeats", 3, "Measurements per step kind; the median is reported.")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_string("model", "resnet32", "Classifier.")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_integer("num_classes", 100, "Head size.")


def _learner_case(loss_fn, with_teacher: bool):
    model = models.create_classifier(FLAGS.model, FLAGS.num_classes, FLAGS.dtype)
    mesh = experiment.make_mesh()
    cfg = train.StepConfig(batch_size=FLAGS.batch_size, base_lr=0.1, lr_milestones=(100,),
                           lr_decay=0.1, augment=data_lib.AugmentConfig(),
                           mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))
    state = train.create_train_state(model, jax.random.PRNGKey(0), (32, 32, 3), 0.1, 0.9, 2e-4)
    n = 5000
    rng = np.random.RandomState(0)
    images = jnp.asarray(rng.randint(0, 256, (n, 32, 32, 3)), jnp.uint8)
    labels = jnp.asarray(rng.randint(10, 20, n), jnp.int32)
    task = train.TaskInfo(index=jnp.arange(n, dtype=jnp.int32), count=jnp.int32(n),
                          num_old=jnp.int32(10), num_seen=jnp.int32(20),
                          steps_per_epoch=jnp.int32(n // FLAGS.batch_size),
                          total_steps=jnp.int32(10**9), key=jax.random.PRNGKey(1))
    frozen = train.Frozen(train.teacher_of(state)) if with_teacher else None
    fn = jax.jit(train.make_train_chunk(model, loss_fn, cfg, mesh, _steps_per_call()))
    return fn, state, (frozen, images, labels, task)


def _steps_per_call() -> int:
    return FLAGS.steps_per_call or train.default_steps_per_call()


def time_chunk(fn, state, args) -> tuple[float, float]:
    """(compile + first call seconds, median ms per step over FLAGS.repeats measurements)."""
    tic = time.perf_counter()
    state, metrics = fn(state, *args)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - tic
    calls = max(1, FLAGS.steps // _steps_per_call())
    times = []
    for _ in range(FLAGS.repeats):
        tic = time.perf_counter()
        for _ in range(calls):
            state, metrics = fn(state, *args)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - tic) / (calls * _steps_per_call()) * 1e3)
    return first, float(np.median(times))


def main(argv):
    del argv
    device = jax.devices()[0]
    print(f"backend {jax.default_backend()}, {jax.device_count()} x {device.device_kind}, "
          f"jax {jax.__version__}, model {FLAGS.model} ({FLAGS.dtype}), "
          f"batch {FLAGS.batch_size}")
    cases = {
        "learner step, task 1 (CE)": _learner_case(train.cross_entropy_loss, False),
        "learner step, LwF (teacher fwd)": _learner_case(lwf.make_lwf_loss(1.0, 2.0), True),
    }
    print(f"{'step':40s} {'compile s':>10s} {'ms/step':>9s} {'images/s':>10s}")
    for name, (fn, state, args) in cases.items():
        first, ms = time_chunk(fn, state, args)
        print(f"{name:40s} {first:10.1f} {ms:9.2f} {FLAGS.batch_size / ms * 1e3:10.0f}")


if __name__ == "__main__":
    app.run(main)
