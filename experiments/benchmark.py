"""Time the jitted training steps, the whole task loop, or the streaming input path on the
available backend, and locate where a step's time goes.

    python experiments/benchmark.py [--steps=200] [--repeats=5] [--dtypes=float32,bfloat16]
        [--conv_impls=xla,im2col] [--cases=ce,lwf,abd,deepinversion,generator]
        [--ladder=ce,abd] [--vmap_repeats=3] [--profile_dir=/tmp/prof] [--json_out=bench.json]
    python experiments/benchmark.py --mode=run --workdir=/tmp/timing \
        [--config=configs/cifar100.py] [--config.epochs=25 --config.synthesis.iterations=1000]
    python experiments/benchmark.py --mode=stream --config=configs/cifar10.py \
        --config.data_dir=<prepared> [--stream_workers=0,2] [--fake_imagenet=1500]
    python experiments/benchmark.py --mode=analytic [--expansion=8192] [--analytic_batch=4096]

`--mode=steps` (the default) uses random CIFAR-shaped data (`--image_size` for other sizes; no
dataset needed) and the real step functions of `abd_jax.train` / `abd_jax.synthesis`:
on-device batch sampling and augmentation, the method's loss (synthetic replay with the
teacher's forward), the optimiser update, data parallelism over all local devices. Three
parts, each printing min / median / max ms per step over `--repeats` measurements:

1. **Step table** (`--cases`, for every `--dtypes` x `--conv_impls`): the steps as training
   runs them (fused `lax.scan` chunks of `--steps_per_call` steps), images/s, and the
   projected full 10-task CIFAR-100 ABD run (250 epochs x 39 steps per task, 10,000 generator
   iterations after tasks 1-9; evaluation and compilation not included).
2. **Ladder** (`--ladder`): the same step built up one stage at a time, so the stage that costs
   is the one whose rung jumps: forward only -> forward + input gradient (no weight gradients)
   -> forward + backward (all gradients) -> + optimiser update -> + on-device batch sampling ->
   + augmentation (the complete step, one per call) -> + fused `lax.scan` chunking.
3. **Profile** (`--profile_dir`): a `jax.profiler` trace of the fused step of each ladder case,
   with the top kernels (GPU/TPU) or XLA ops (CPU) by device time per step.

`--vmap_repeats=R` adds rows timing R repeats trained as one program (`jax.vmap` over stacked
states) for the ce and abd cases among `--cases`: what training repeats side by side would cost
(the runner trains repeats one after another).

`--mode=run` times the whole task loop of `--config` (compilation, training, synthesis,
evaluation, checkpoints) on random images shaped like its dataset (`--train_per_class`,
`--test_per_class`; no dataset needed). Accuracies are meaningless; the printed wall times are
not. The run writes the usual results files (with per-task wall times) to `--workdir`. SIGTERM
or Ctrl-C stops it at the next jitted call with a checkpoint (exit 130); the same command
resumes it, so a run longer than one sitting is timed as consecutive segments
(`experiments/gpu_session.sh`).

`--mode=stream` gives images/s of the streaming input path (`input_pipeline.StreamFeed`
alone: grain reading `--config`'s prepared array_record files, decoding and the dataset's host
transform, stacking and placing each batch on the mesh, `--config.stream_prefetch` batches
ahead) for every `--stream_workers` count, min / median / max over `--repeats` of `--steps`
batches of `--batch_size`. `--fake_imagenet=N` first writes ILSVRC2012 tars of N photo-sized
JPEGs and prepares imagenet2012 from them (ImageNet-shaped data, random-resized crop to 224).

`--mode=analytic` times one batch of ACIL's and DS-AL's recursive update (`analytic.fit_batch`:
`--analytic_batch` random 512-d features, expansion `--expansion`, `--num_classes` targets) in
float64 on the host (NumPy) and on device (jitted under `jax.enable_x64`): the choice
`--config.analytic.compute` makes.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags
from PIL import Image

from abd_jax import data as data_lib
from abd_jax import (augment, experiment, input_pipeline, logs, methods, models, sampling,
                     synthesis, train)
from abd_jax.methods import analytic
from abd_jax.methods.teacher import FrozenModel
from abd_jax.session import Session
from configs import cifar100

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "steps", ["steps", "run", "stream", "analytic"], "steps: the step "
                  "table, ladder and profile; run: the whole task loop of --config on random "
                  "data; stream: the streaming input path on --config's prepared dataset; "
                  "analytic: ACIL's and DS-AL's float64 update, host against device.")
config_flags.DEFINE_config_file(
    "config", str(Path(__file__).resolve().parents[1] / "configs" / "cifar100.py"),
    "--mode=run and stream: the config file (with --config.* overrides).", lock_config=True)
flags.DEFINE_integer("steps", 100, "Timed steps (--mode=stream: batches) per measurement.")
flags.DEFINE_integer("steps_per_call", 0, "Steps per fused call (0 = auto: 1 on CPU, 50 else).")
flags.DEFINE_integer("repeats", 3, "Measurements per row (min / median / max reported).")
flags.DEFINE_integer("batch_size", 128, "Global batch size (--mode=steps and stream).")
flags.DEFINE_string("model", "resnet32", "Classifier.")
flags.DEFINE_list("dtypes", ["float32"], "Compute dtypes of the step table.")
flags.DEFINE_list("conv_impls", ["auto"], "Convolution implementations (auto, xla, im2col).")
flags.DEFINE_list("skip_modes", ["default"], "How fused chunks skip steps past the end "
                  "(cond, mask; see train.fuse_steps). 'default': as training does (learner "
                  "cond, generator mask).")
flags.DEFINE_integer("num_classes", 100, "Head size.")
flags.DEFINE_integer("image_size", 32, "Side of the random square RGB images (32: CIFAR, 64: "
                     "Tiny-ImageNet; the tests use 8). The projection keeps CIFAR-100's "
                     "schedule whatever the size.")
flags.DEFINE_string("generator_dtype", "", "The generator's compute dtype in the abd, "
                    "deepinversion and generator rows ('' = the row's dtype, as training).")
flags.DEFINE_list("cases", ["ce", "lwf", "abd", "deepinversion", "generator"],
                  "Step table rows (empty: none).")
flags.DEFINE_list("ladder", [], "Learner cases to break down stage by stage (ce, lwf, abd, "
                  "deepinversion).")
flags.DEFINE_integer("vmap_repeats", 0, "If > 1, also time the ce/abd cases among --cases with "
                     "this many repeats vmapped into one program.")
flags.DEFINE_string("profile_dir", "", "Write a profiler trace of each ladder case here and "
                    "print its top ops by device time.")
flags.DEFINE_integer("top", 12, "Ops listed per profile.")
flags.DEFINE_string("json_out", "", "Also write every measurement to this JSON file.")
flags.DEFINE_string("workdir", "", "--mode=run: output folder (the same command resumes a "
                    "stopped run there).")
flags.DEFINE_integer("train_per_class", 500, "--mode=run: random training images per class.")
flags.DEFINE_integer("test_per_class", 100, "--mode=run: random test images per class.")
flags.DEFINE_list("stream_workers", ["0", "2"], "--mode=stream: grain worker process counts.")
flags.DEFINE_integer("fake_imagenet", 0, "--mode=stream: if > 0, write ILSVRC2012 tars with "
                     "this many training JPEGs (10 classes, 500x375) into "
                     "<data_dir>/fake_ilsvrc, prepare imagenet2012 from them in "
                     "<data_dir>/fake_imagenet and stream that.")
flags.DEFINE_integer("expansion", 8192, "--mode=analytic: the random expansion's width E.")
flags.DEFINE_integer("analytic_batch", 4096, "--mode=analytic: features per recursive update.")
flags.DEFINE_bool("put_state", True, "Place the initial state on the mesh (replicated) as "
                  "training does. False leaves it uncommitted: the first call's state then "
                  "differs from the committed state it returns, so the second call compiles "
                  "again inside the first measurement (flagged RECOMPILED).")

# The PyTorch release (GT-RIPL/AlwaysBeDreaming-DFCIL, torch 2.11), ResNet-32 batch 128
# float32 on one NVIDIA H200 (docs/performance.md).
RELEASE_MS_H200 = {"ce": 12.1, "abd": 52.9, "deepinversion": 44.9, "generator": 53.9}

LEARNER_CASES = {  # key: (label, method, first task?, images per batch element)
    "ce": ("learner, task 1 (CE)", "base", True, 1),
    "lwf": ("learner, LwF (teacher fwd)", "lwf", False, 1),
    "abd": ("learner, ABD task 2 (B real + B syn)", "abd", False, 2),
    "deepinversion": ("learner, DeepInversion (B + B syn)", "deepinversion", False, 2),
}


def _method_config(name: str, dtype: str):
    config = cifar100.get_config()
    config.method = name
    config.batch_size = FLAGS.batch_size
    config.dtype = dtype
    config.synthesis.generator_dtype = FLAGS.generator_dtype
    return config


def _method(name: str, dtype: str) -> methods.Method:
    spec = dataclasses.replace(data_lib.get_spec("cifar100"), num_classes=FLAGS.num_classes,
                               image_shape=_image_shape())
    return methods.get_method(_method_config(name, dtype), spec)


def _image_shape() -> tuple[int, int, int]:
    return FLAGS.image_size, FLAGS.image_size, 3


def _steps_per_call() -> int:
    return FLAGS.steps_per_call or train.default_steps_per_call()


@dataclasses.dataclass
class Learner:
    """Everything one learner step needs, on device."""

    model: Any
    loss_fn: Callable
    cfg: train.StepConfig
    mesh: Any
    state: train.TrainState
    method_state: Any
    data: sampling.DeviceData
    task: sampling.TaskInfo

    @property
    def args(self):
        return self.method_state, self.data, self.task


def make_learner(session: Session, case: str, dtype: str, conv_impl: str,
                 seed: int = 0) -> Learner:
    """The step of `case` in task 2 (K_old = 10, K_new = 20) or, for "ce", task 1, with the
    method's state as the task loop builds it (teacher = the initial model)."""
    _, method_name, first_task, _ = LEARNER_CASES[case]
    method = _method(method_name, dtype)
    model = models.create_classifier(FLAGS.model, FLAGS.num_classes, dtype, conv_impl)
    mesh = experiment.make_mesh()
    cfg = train.StepConfig(batch_size=FLAGS.batch_size, lr_decay=0.1,
                           augment=augment.AugmentConfig(), mean=(0.5071, 0.4865, 0.4409),
                           std=(0.2673, 0.2564, 0.2762))
    tx = train.learner_optimizer(session, 0.1, 0.9, 2e-4)
    state = train.create_train_state(session, model, jax.random.PRNGKey(seed), _image_shape(),
                                     tx)
    n = 5000
    rng = np.random.RandomState(seed)
    images = jnp.asarray(rng.randint(0, 256, (n, *_image_shape())), jnp.uint8)
    labels = jnp.asarray(rng.randint(10, 20, n), jnp.int32)
    task = sampling.TaskInfo(index=jnp.arange(n, dtype=jnp.int32), count=jnp.int32(n),
                             num_old=jnp.int32(10), num_seen=jnp.int32(20),
                             steps_per_epoch=jnp.int32(n // FLAGS.batch_size),
                             total_steps=jnp.int32(10**9), key=jax.random.PRNGKey(seed + 1),
                             base_lr=jnp.float32(0.1),
                             lr_milestones=jnp.asarray(sampling.lr_milestones((100,), 1)),
                             cosine_epochs=jnp.int32(0))
    rt = methods.Runtime(config=_method_config(method_name, dtype), plan=None, model=model,
                         mesh=mesh, image_shape=_image_shape(), steps_per_call=_steps_per_call(),
                         method_key=np.array([0, seed + 2], np.uint32), session=session)
    method_state = method.init_state(rt, state)
    loss_fn = method.loss_fn(methods.Task(index=0 if first_task else 1, num_tasks=10,
                                          num_old=0 if first_task else 10, num_seen=20))
    if FLAGS.put_state:
        replicated = NamedSharding(mesh, P())
        state, method_state, images, labels, task = jax.device_put(
            (state, method_state, images, labels, task), replicated)
    return Learner(model, loss_fn, cfg, mesh, state, method_state,
                   sampling.DeviceData(images, labels), task)


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
    compile_s: float
    ms: list  # ms per step, one per measurement
    recompiled: bool = False  # the jitted function compiled again while being timed

    def stats(self) -> tuple[float, float, float]:
        return float(np.min(self.ms)), float(np.median(self.ms)), float(np.max(self.ms))


def _cache_size(fn) -> int:
    return fn._cache_size() if hasattr(fn, "_cache_size") else -1


def time_fn(fn: Callable, state, args, steps_per_call: int, carries_state: bool) -> Timing:
    """Compile + first call, then FLAGS.repeats measurements of ~FLAGS.steps steps each.

    `fn(state, *args)` returns `(state, out)` when `carries_state`, else any output. A
    compilation during the measurements (a changed input type or sharding) is reported."""
    def call(s):
        out = fn(s, *args)
        return (out[0], out) if carries_state else (s, out)

    tic = time.perf_counter()
    state, out = call(state)
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - tic
    compiled = _cache_size(fn)
    calls = max(1, FLAGS.steps // steps_per_call)
    ms = []
    for _ in range(FLAGS.repeats):
        tic = time.perf_counter()
        for _ in range(calls):
            state, out = call(state)
        jax.block_until_ready(out)
        ms.append((time.perf_counter() - tic) / (calls * steps_per_call) * 1e3)
    return Timing(compile_s, ms, _cache_size(fn) != compiled)


def _skip(skip: str) -> dict:
    return {} if skip == "default" else {"skip": skip}


def _fused_learner(lr: Learner, skip: str = "default"):
    return jax.jit(train.make_train_chunk(lr.model, lr.loss_fn, lr.cfg, lr.mesh,
                                          _steps_per_call(), **_skip(skip)))


def _generator_setup(session: Session, dtype: str, conv_impl: str, skip: str = "default"):
    method = _method("abd", dtype)  # its synthesis settings and generator
    model = models.create_classifier(FLAGS.model, FLAGS.num_classes, dtype, conv_impl)
    synth = synthesis.Synthesizer(session, method.synthesis, method.generator, model,
                                  experiment.make_mesh(), _steps_per_call(), **_skip(skip))
    variables = models.init_variables(session, model, jax.random.PRNGKey(0),
                                      (1, *_image_shape()), train=False)
    teacher = FrozenModel(variables["params"], variables["batch_stats"])
    args = synth.step_args(2**30, teacher, 20, np.array([0, 4], np.uint32))
    return synth.fused_step, synth.init(jax.random.PRNGKey(3)), args


def _stack(trees):
    """Stack same-structured pytrees on a new leading axis (static fields from the first)."""
    leaves = [jax.tree.leaves(t) for t in trees]
    return jax.tree.unflatten(jax.tree.structure(trees[0]),
                              [jnp.stack(group) for group in zip(*leaves)])


def vmapped_learner(session: Session, case: str, dtype: str, conv_impl: str, repeats: int):
    """`repeats` learners (own seeds: params, data, task key) as one vmapped fused chunk."""
    learners = [make_learner(session, case, dtype, conv_impl, seed=r) for r in range(repeats)]
    lr = learners[0]
    chunk = train.make_train_chunk(lr.model, lr.loss_fn, lr.cfg, lr.mesh, _steps_per_call())
    fn = jax.jit(jax.vmap(chunk))
    states = _stack([x.state for x in learners])
    args = tuple(_stack([x.args[i] for x in learners]) if learners[0].args[i] is not None
                 else None for i in range(3))
    return fn, states, args


# ----------------------------------------------------------------------------- ladder


def ladder_rungs(lr: Learner) -> list[tuple[str, Callable, bool, int]]:
    """[(name, fn(state, method_state, data, task), carries_state, steps/call)]."""
    model, loss_fn, cfg, mesh = lr.model, lr.loss_fn, lr.cfg, lr.mesh
    # A fixed, already-normalised batch for the rungs before sampling.
    fixed = np.random.RandomState(5).randint(0, 256, (cfg.batch_size, *_image_shape()))
    x_fixed = augment.normalize(jnp.asarray(fixed, jnp.uint8), cfg.mean, cfg.std)
    y_fixed = jnp.asarray(np.random.RandomState(6).randint(10, 20, cfg.batch_size), jnp.int32)
    key = jax.random.PRNGKey(7)

    def loss_value(state, method_state, task, x, params):
        return train.method_loss(model, loss_fn, state, method_state, x, y_fixed, task, key,
                                 params)[0]

    def forward(state, method_state, data, task):
        return loss_value(state, method_state, task, x_fixed, state.params)

    def input_grad(state, method_state, data, task):
        return jax.grad(lambda x: loss_value(state, method_state, task, x, state.params))(
            x_fixed)

    def fwd_bwd(state, method_state, data, task):
        return train.loss_and_grads(model, loss_fn, state, method_state, x_fixed, y_fixed,
                                    task, key)

    def with_update(batch_fn):
        def step(state, method_state, data, task):
            x, y = batch_fn(state, data, task)
            (loss, (new_bs, _)), grads = train.loss_and_grads(model, loss_fn, state,
                                                              method_state, x, y, task, key)
            lr_now = train.learning_rate(state.step, task, cfg.lr_decay)
            return train.sgd_update(state, grads, new_bs, lr_now), loss
        return step

    fixed_batch = lambda state, data, task: (x_fixed, y_fixed)
    sampled = lambda state, data, task: train.task_batch(data, task, state.step, key, cfg,
                                                         mesh, augmented=False)
    one_step = train.make_train_step(model, loss_fn, cfg, mesh)
    k = _steps_per_call()
    rungs = [
        ("forward only", jax.jit(forward), False, 1),
        ("+ input gradient (no weight grads)", jax.jit(input_grad), False, 1),
        ("forward + backward (all gradients)", jax.jit(fwd_bwd), False, 1),
        ("+ optimiser update", jax.jit(with_update(fixed_batch)), True, 1),
        ("+ on-device batch sampling", jax.jit(with_update(sampled)), True, 1),
        ("+ augmentation (= the full step)", jax.jit(one_step), True, 1),
    ]
    if k > 1:
        rungs.append((f"+ fused lax.scan ({k} steps/call)", _fused_learner(lr), True, k))
    return rungs


# ----------------------------------------------------------------------------- profile


def device_op_summary(trace_dir: str, steps: int, top: int) -> dict[str, list]:
    """{line kind: [(op or kernel name, ms per step, % of that line's time)]} from the
    perfetto trace that `jax.profiler.trace(create_perfetto_trace=True)` wrote under
    `trace_dir`.

    On GPU/TPU the device process (named like "/device:GPU:0") has one line per stream
    ("kernels") and summary lines such as "XLA Ops" (HLO ops); each kind is summed on its own.
    On CPU the XLA worker threads' events stand in ("host ops")."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                             recursive=True))
    if not paths:
        return {}
    with gzip.open(paths[-1]) as f:
        events = json.load(f)["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device_pids = {pid for pid, name in procs.items() if "/device:" in name}

    def line_kind(e) -> str:
        thread = threads.get((e["pid"], e.get("tid")), "")
        if e["pid"] in device_pids:
            return "kernels" if "stream" in thread.lower() else thread
        if device_pids or e["name"].startswith("$") or any(
                w in thread for w in ("codegen", "Compiler", ".py", "python")):
            return ""
        return "host ops"

    totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        kind = line_kind(e) if e.get("ph") == "X" else ""
        if kind:
            totals[kind][e["name"]] += float(e.get("dur", 0.0))
    out = {}
    for kind, counter in totals.items():
        whole = sum(counter.values()) or 1.0
        out[kind] = [(name, us / 1e3 / steps, 100.0 * us / whole)
                     for name, us in counter.most_common(top)]
        out[kind].append((f"(all {kind})", whole / 1e3 / steps, 100.0))
    return out


def profile(fn, state, args, steps_per_call: int, trace_dir: str, calls: int,
            top: int) -> dict:
    """`device_op_summary` of `calls` calls of `fn(state, *args) -> (state, out)` (after one
    untraced call, which may compile), traced into `trace_dir`."""
    state, out = fn(state, *args)
    jax.block_until_ready(out)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(calls):
            state, out = fn(state, *args)
        jax.block_until_ready((state, out))
    return device_op_summary(trace_dir, calls * steps_per_call, top)


# ----------------------------------------------------------------------------- --mode=run


def random_splits(config, train_per_class: int, test_per_class: int) -> experiment.Splits:
    """Random uint8 images and balanced labels shaped like `config`'s dataset."""
    spec = data_lib.spec_of(config)
    rng = np.random.RandomState(0)

    def split(per_class):
        labels = np.repeat(np.arange(spec.num_classes, dtype=np.int32), per_class)
        images = rng.randint(0, 256, (len(labels), *spec.image_shape)).astype(np.uint8)
        return images, labels

    return experiment.Splits(spec, *split(train_per_class), *split(test_per_class))


def full_run(session: Session) -> None:
    """`experiment.run` of --config in --workdir on random data, timed; a stop (SIGTERM,
    Ctrl-C) leaves a checkpoint and exits 130."""
    if not FLAGS.workdir:
        raise app.UsageError("--mode=run needs --workdir")
    config = FLAGS.config
    logs.quiet_library_logs()
    tic = time.time()
    session.stop.install()
    splits = random_splits(config, FLAGS.train_per_class, FLAGS.test_per_class)
    try:
        results = experiment.run(config, FLAGS.workdir, splits, session)
    except KeyboardInterrupt:
        print(f"stopped after {time.time() - tic:.1f} s with a checkpoint; the same command "
              "resumes it")
        raise SystemExit(130)
    total = time.time() - tic
    rep = results["repeats"][0]
    print(f"method {config.method}, {config.num_tasks} tasks, {config.epochs} epochs/task, "
          f"{config.synthesis.iterations} generator iterations/task, batch {config.batch_size}")
    print("wall seconds per task:", [round(s, 1) for s in rep["task_wall_seconds"]])
    seconds = rep["train_seconds_per_batch"]  # None when every loop was one call
    print("seconds per training batch:", "n/a" if seconds is None else f"{seconds:.5f}")
    print(f"wall time of this process's run: {total:.1f} s; peak memory "
          f"{rep['peak_memory_bytes'] / 2**20:.0f} MiB")


# ----------------------------------------------------------------------------- --mode=stream


def make_fake_imagenet(folder: Path, count: int) -> None:
    """ILSVRC2012_img_{train,val}.tar in `folder`: `count` training JPEGs of 500x375 over
    the first 10 classes of TFDS's labels.txt (smooth random images, photo-sized files),
    and 10 validation JPEGs; written once."""
    from abd_jax import datasets  # noqa: PLC0415 (TFDS only for this mode)
    if (folder / "ILSVRC2012_img_val.tar").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    wnids = datasets.IMAGENET_LABELS_FILE.read_text().split()[:10]
    val_wnids = datasets.IMAGENET_VAL_LABELS_FILE.read_text().split()
    rng = np.random.default_rng(0)

    def jpeg() -> bytes:
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(coarse).resize((500, 375), Image.BICUBIC).save(buf, "JPEG",
                                                                      quality=90)
        return buf.getvalue()

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(folder / "ILSVRC2012_img_train.tar", "w") as train_tar:
        for c, wnid in enumerate(wnids):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as class_tar:
                for i in range(c, count, len(wnids)):
                    add(class_tar, f"{wnid}_{i}.JPEG", jpeg())
            add(train_tar, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(folder / "ILSVRC2012_img_val.tar.part", "w") as val_tar:
        for wnid in wnids:
            number = val_wnids.index(wnid) + 1
            add(val_tar, f"ILSVRC2012_val_{number:08d}.JPEG", jpeg())
    (folder / "ILSVRC2012_img_val.tar.part").rename(folder / "ILSVRC2012_img_val.tar")


def time_feed(source, spec, labels, workers: int, prefetch: int,
              session: Session) -> list[float]:
    """images/s of each repeat: `--steps` batches through a fresh feed (after 2 warm-up)."""
    n, b = len(labels), FLAGS.batch_size
    info = sampling.TaskInfo(index=np.arange(n, dtype=np.int32), count=np.int32(n),
                             num_old=np.int32(0), num_seen=np.int32(spec.num_classes),
                             steps_per_epoch=np.int32(n // b),
                             total_steps=np.int32(n // b * 1000),
                             key=np.array([0, 0], np.uint32), base_lr=np.float32(0.1),
                             lr_milestones=np.zeros(0, np.int32),
                             cosine_epochs=np.int32(0))
    rates = []
    for r in range(FLAGS.repeats):
        feed = input_pipeline.StreamFeed(
            source, spec, labels, info, r * (FLAGS.steps + 2), b, 1, experiment.make_mesh(),
            workers, prefetch, input_pipeline.train_transform(spec), session)
        for _ in range(2):
            jax.block_until_ready(feed.next_call().images)
        tic = time.perf_counter()
        for _ in range(FLAGS.steps):
            jax.block_until_ready(feed.next_call().images)
        rates.append(FLAGS.steps * b / (time.perf_counter() - tic))
    return rates


def stream_report(session: Session) -> None:
    """images/s of the streaming input path for each --stream_workers count."""
    config = FLAGS.config
    name = config.dataset
    data_dir = str(data_lib.expand_path(config.data_dir)) if config.data_dir else None
    if FLAGS.fake_imagenet:
        from abd_jax import datasets  # noqa: PLC0415 (TFDS only for this mode)
        base = Path(data_dir or "/tmp")
        make_fake_imagenet(base / "fake_ilsvrc", FLAGS.fake_imagenet)
        name, data_dir = "imagenet2012", str(base / "fake_imagenet")
        datasets.download_and_prepare(name, data_dir, base / "fake_ilsvrc")
    spec = data_lib.get_spec(name, data_dir, config.image_size)
    source = data_lib.open_split(spec, "train", data_dir)
    labels = input_pipeline.split_labels(data_lib.open_split(
        spec, "train", data_dir, decoders=input_pipeline.labels_only()), session)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax "
          f"{jax.__version__}, host CPUs: {os.cpu_count()}")
    print(f"dataset {name}: {len(labels)} training images {spec.image_shape}, batch "
          f"{FLAGS.batch_size}, {FLAGS.steps} batches x {FLAGS.repeats} repeats, prefetch "
          f"{config.stream_prefetch}")
    print(f"{'workers':>8s} {'min':>10s} {'median':>10s} {'max':>10s}  images/s")
    for workers in (int(w) for w in FLAGS.stream_workers):
        rates = time_feed(source, spec, labels, workers, config.stream_prefetch, session)
        print(f"{workers:8d} {min(rates):10.0f} {np.median(rates):10.0f} {max(rates):10.0f}",
              flush=True)


# ----------------------------------------------------------------------------- main


def _row(label: str, t: Timing, images: int) -> str:
    lo, med, hi = t.stats()
    return (f"{label:52s} {t.compile_s:8.1f} {lo:8.2f} {med:8.2f} {hi:8.2f} "
            f"{images / med * 1e3:10.0f}" + ("  RECOMPILED while timed" if t.recompiled else ""))


HEADER = f"{'':52s} {'compile':>8s} {'min':>8s} {'median':>8s} {'max':>8s} {'images/s':>10s}"


def main(argv):
    del argv
    with Session() as session:
        {"steps": report, "run": full_run, "stream": stream_report,
         "analytic": analytic_report}[FLAGS.mode](session)


def analytic_report(session: Session) -> None:
    """Seconds per recursive update (min / median / max over --repeats), host and device."""
    e, b, c = FLAGS.expansion, FLAGS.analytic_batch, FLAGS.num_classes
    rng = np.random.default_rng(0)
    features = rng.random((b, 512))
    targets = np.eye(c)[rng.integers(0, c, b)]
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), float64, E {e}, "
          f"batch {b}, {c} classes: seconds per update (min / median / max of "
          f"{FLAGS.repeats})", flush=True)
    for dual, label in ((False, "ACIL"), (True, "DS-AL")):
        arrays = {"projection": analytic.random_projection(np.array([0, 1], np.uint32), 512, e),
                  "r": np.eye(e) * 10.0, "w": np.zeros((e, c))}
        if dual:
            arrays.update(r_comp=np.eye(e) * 10.0, w_comp=np.zeros((e, c)))
        update = session.jitted(analytic._jitted_fit, dual)
        runs = {
            "host (NumPy)": lambda: analytic.fit_batch(arrays, features, targets, 0, dual),
            "device (XLA, x64)": lambda: jax.block_until_ready(update(
                placed, jax.device_put(features), jax.device_put(targets), 0)),
        }
        with jax.enable_x64(True):
            placed = jax.device_put(arrays)
            runs["device (XLA, x64)"]()  # compile
            for name, run in runs.items():
                times = []
                for _ in range(FLAGS.repeats):
                    tic = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - tic)
                print(f"  {label:6s} {name:18s} {min(times):8.2f} {np.median(times):8.2f} "
                      f"{max(times):8.2f}", flush=True)


def report(session: Session) -> None:
    """The parts the flags ask for, printed (and recorded to --json_out)."""
    device = jax.devices()[0]
    print(f"backend {jax.default_backend()}, {jax.device_count()} x {device.device_kind}, "
          f"jax {jax.__version__}, model {FLAGS.model}, batch {FLAGS.batch_size}, "
          f"{_steps_per_call()} steps/call, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
          flush=True)
    record: dict[str, Any] = {"device": device.device_kind, "backend": jax.default_backend(),
                              "jax": jax.__version__, "rows": []}

    def note(part, label, dtype, conv_impl, t: Timing, images):
        lo, med, hi = t.stats()
        record["rows"].append(dict(part=part, label=label, dtype=dtype, conv_impl=conv_impl,
                                   compile_s=t.compile_s, ms=t.ms, ms_min=lo, ms_median=med,
                                   ms_max=hi, images_per_s=images / med * 1e3,
                                   recompiled=t.recompiled))

    b = FLAGS.batch_size
    for case in FLAGS.ladder:
        for conv_impl in FLAGS.conv_impls:
            dtype = FLAGS.dtypes[0]
            lr = make_learner(session, case, dtype, conv_impl)
            print(f"\nladder: {LEARNER_CASES[case][0]}, {dtype}, conv {conv_impl} "
                  "(ms per step)\n" + HEADER, flush=True)
            for name, fn, carries, k in ladder_rungs(lr):
                t = time_fn(fn, lr.state, lr.args, k, carries)
                print(_row("  " + name, t, b * LEARNER_CASES[case][3]), flush=True)
                note("ladder", f"{case}: {name}", dtype, conv_impl, t, b)
            if FLAGS.profile_dir:
                trace_dir = os.path.join(FLAGS.profile_dir, f"{case}_{conv_impl}")
                try:
                    summary = profile(
                        _fused_learner(lr), lr.state, lr.args, _steps_per_call(), trace_dir,
                        max(1, FLAGS.steps // _steps_per_call()), FLAGS.top)
                except Exception as err:  # noqa: BLE001 (a profiler failure ends no timing)
                    print(f"  profiler failed: {type(err).__name__}: {err}")
                    summary = {}
                print(f"  profile of the fused step (trace in {trace_dir}):")
                for kind, rows in summary.items():
                    print(f"   top {kind}:")
                    for name, ms, pct in rows:
                        print(f"    {ms:8.3f} ms/step {pct:5.1f}%  {name[:110]}")
                record.setdefault("profiles", {})[f"{case}_{conv_impl}"] = summary

    if FLAGS.cases and FLAGS.cases != [""]:
        print("\nstep table (ms per step, fused as in training)\n" + HEADER, flush=True)
    ms_of: dict[tuple, float] = {}
    combos = [(d, c, k) for d in FLAGS.dtypes for c in FLAGS.conv_impls for k in FLAGS.skip_modes]
    for dtype, conv_impl, skip in combos:
        tag = f"{dtype}, {conv_impl}" + (f", {skip}" if len(FLAGS.skip_modes) > 1 else "")
        if FLAGS.generator_dtype:
            tag += f", G {FLAGS.generator_dtype}"
        for case in [c for c in FLAGS.cases if c]:
            if case == "generator":
                fn, state, args = _generator_setup(session, dtype, conv_impl, skip)
                label, images = "generator iteration (31-layer KL)", b
            else:
                lr = make_learner(session, case, dtype, conv_impl)
                fn, state, args = _fused_learner(lr, skip), lr.state, lr.args
                label, images = LEARNER_CASES[case][0], b * LEARNER_CASES[case][3]
            t = time_fn(fn, state, args, _steps_per_call(), True)
            ms_of[(tag, case)] = t.stats()[1]
            print(_row(f"{label} [{tag}]", t, images), flush=True)
            note("table", case, dtype, conv_impl, t, images)
        if FLAGS.vmap_repeats > 1:
            for case in [c for c in ("ce", "abd") if c in FLAGS.cases]:
                r = FLAGS.vmap_repeats
                fn, states, args = vmapped_learner(session, case, dtype, conv_impl, r)
                t = time_fn(fn, states, args, _steps_per_call(), True)
                print(_row(f"{r} vmapped repeats: {case} [{tag}]", t,
                           r * b * LEARNER_CASES[case][3]) + f"  (one step of all {r})",
                      flush=True)
                note("vmap", f"{case} x{r}", dtype, conv_impl, t, r * b)
        if {"ce", "abd", "generator"} <= set(FLAGS.cases):
            ms = {c: ms_of[(tag, c)] for c in ("ce", "abd", "generator")}
            steps_per_task = 250 * (5000 // b)
            projected = (steps_per_task * (ms["ce"] + 9 * ms["abd"])
                         + 9 * 10_000 * ms["generator"]) / 1e3
            print(f"projected 10-task CIFAR-100 ABD run [{tag}] (training + synthesis only; "
                  f"a projection, not a run): {projected / 60:.1f} min", flush=True)
            if jax.default_backend() == "gpu":
                for c in ("ce", "abd", "generator"):
                    release = RELEASE_MS_H200[c]
                    print(f"  {c:10s} {ms[c]:7.2f} ms   PyTorch release on an H200: "
                          f"{release:.1f} ms -> {release / ms[c]:.1f}x")
    if FLAGS.json_out:
        Path(FLAGS.json_out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    app.run(main)
