"""Time the jitted training steps on the available backend.

    python experiments/benchmark.py [--steps=50] [--batch_size=128] [--model=resnet32]

Prints ms per step and images/s for each step kind, with the device name, and the projected
time of a full 10-task CIFAR-100 ABD run (250 epochs of 39 steps per task, 10,000 generator
iterations after each of the first 9 tasks). Uses random CIFAR-shaped data (no dataset
needed) and the real steps: augmentation, batching, optimiser update, synthetic replay with
the teacher's forward, data parallelism over all local devices.
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
from abd_jax import experiment, methods, models, synthesis, train  # noqa: E402
from configs import cifar100  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 50, "Timed steps per measurement.")
flags.DEFINE_integer("steps_per_call", 0, "Steps per jitted call (0 = auto: 1 on CPU, 50 else).")
flags.DEFINE_integer("repeats", 3, "Measurements per step kind; the median is reported.")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_string("model", "resnet32", "Classifier.")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_integer("num_classes", 100, "Head size.")
flags.DEFINE_list("cases", ["ce", "lwf", "abd", "deepinversion", "generator"],
                  "Which steps to time.")


def _method(name: str) -> methods.Method:
    config = cifar100.get_config()
    config.method = name
    config.batch_size = FLAGS.batch_size
    return methods.get_method(config, (32, 32, 3))


def _generator_variables(method: methods.Method):
    z = jnp.zeros((2, method.synthesis.z_dim))
    return method.generator.init(jax.random.PRNGKey(2), z, train=False)


def _learner_case(method_name: str, first_task: bool):
    method = _method(method_name)
    loss_fn = train.cross_entropy_loss if first_task else method.loss
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
    frozen = None
    if not first_task:
        extra = _generator_variables(method) if method.generator is not None else None
        frozen = train.Frozen(train.teacher_of(state), extra)
    fn = jax.jit(train.make_train_chunk(model, loss_fn, cfg, mesh, _steps_per_call()))
    return fn, state, (frozen, images, labels, task)


def _generator_case():
    method = _method("abd")
    model = models.create_classifier(FLAGS.model, FLAGS.num_classes, FLAGS.dtype)
    mesh = experiment.make_mesh()
    synth = synthesis.Synthesizer(method.synthesis, method.generator, model, mesh,
                                  _steps_per_call())
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    teacher = train.Teacher(variables["params"], variables["batch_stats"])
    gen_state = synth.init(jax.random.PRNGKey(3))
    step_fn = lambda s, *a: synth.fused_step(s, jnp.int32(2**30), *a)
    return step_fn, gen_state, (teacher, jnp.int32(20), jax.random.PRNGKey(4))


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
    cases = {  # key: (label, builder, images per batch element)
        "ce": ("learner, task 1 (CE)", lambda: _learner_case("base", True), 1),
        "lwf": ("learner, LwF (teacher fwd)", lambda: _learner_case("lwf", False), 1),
        "abd": ("learner, ABD task 2 (B real + B syn)", lambda: _learner_case("abd", False), 2),
        "deepinversion": ("learner, DeepInversion (B + B syn)",
                          lambda: _learner_case("deepinversion", False), 2),
        "generator": ("generator iteration (31-layer KL)", _generator_case, 1),
    }
    print(f"{'step':40s} {'compile s':>10s} {'ms/step':>9s} {'images/s':>10s}")
    ms_of = {}
    for key in FLAGS.cases:
        name, build, images_per_sample = cases[key]
        fn, state, args = build()
        first, ms = time_chunk(fn, state, args)
        ms_of[key] = ms
        rate = FLAGS.batch_size * images_per_sample / ms * 1e3
        print(f"{name:40s} {first:10.1f} {ms:9.2f} {rate:10.0f}", flush=True)
    if {"ce", "abd", "generator"} <= set(ms_of):
        steps_per_task = 250 * (5000 // FLAGS.batch_size)
        projected = (steps_per_task * (ms_of["ce"] + 9 * ms_of["abd"])
                     + 9 * 10_000 * ms_of["generator"]) / 1e3
        print(f"projected 10-task CIFAR-100 ABD run (training + synthesis only): "
              f"{projected / 60:.1f} min")


if __name__ == "__main__":
    app.run(main)
