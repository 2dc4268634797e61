"""The PyTorch release's own steps, timed: `experiments/gpu_session.sh`'s helper for its
"release" part, which runs it between two runs of `benchmark.py` on one device and sets the
figures side by side. ResNet-32 at batch 128 on random CIFAR-100-shaped data:

    PYTHONPATH=<the release: GT-RIPL/AlwaysBeDreaming-DFCIL> python3 experiments/release_bench.py

- ce: `NormalNN.update_model` on task 1 (10 classes).
- abd: one training step of `AlwaysBeDreaming` on task 2, as its `learn_batch` loop makes it:
  128 synthetic images sampled from the generator and scored by the previous model, the
  previous model's scores of the real batch, then `update_model` on the 256 images.
- generator: one iteration of the release's inversion (`Teacher.get_images`, batch 128).

The release runs unchanged, with its CIFAR-100 ABD settings (`experiments/cifar100-tentask.sh`
there); its top-level modules (`learners`, `models`, `utils`) are imported from PYTHONPATH.
torch is not a dependency of this project: run this with an interpreter that has torch (the
GPU session uses the machine's own python3, apart from the project's environment). The
release calls `.cuda()` itself; `--device=cpu` turns those calls into no-ops, to try this on a
machine without a GPU. Prints the median, min and max ms per step over --repeats measurements
of --steps steps each (after --warmup steps), and writes them to --json_out.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import statistics
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("device", "cuda", ["cuda", "cpu"], "cpu: a try-out without a GPU.")
flags.DEFINE_list("cases", ["ce", "abd", "generator"], "Steps to time.")
flags.DEFINE_integer("batch_size", 128, "Real images per step (the release's BS).")
flags.DEFINE_integer("steps", 200, "Steps per measurement.")
flags.DEFINE_integer("repeats", 5, "Measurements per case.")
flags.DEFINE_integer("warmup", 10, "Steps before the measurements (cuDNN's autotuning).")
flags.DEFINE_string("json_out", "", "Write the measurements here as JSON.")
# The release's ABD step indexes a vector as long as its 2 x batch images by class id.
flags.register_validator("batch_size", lambda n: n >= 10,
                         "the release's ABD step needs 2 x batch_size >= 20 (task 2's classes)")

CLASSES, TASK = 100, 10  # CIFAR-100 in tasks of 10 classes
# The release's CIFAR-100 ABD run (experiments/cifar100-tentask.sh and trainer.py).
LEARNER_CONFIG = dict(
    num_classes=CLASSES, out_dim=CLASSES, lr=0.1, momentum=0.9, weight_decay=2e-4,
    schedule=[100, 150, 200, 250], schedule_type="decay", optimizer="SGD",
    model_type="resnet", model_name="resnet32", gen_model_type="generator",
    gen_model_name="CIFAR_GEN", gpuid=[0], memory=0, temp=2.0, overwrite=True, beta=1.0,
    mu=0.1, DW=False, power_iters=10000, deep_inv_params=[1e-3, 5e1, 1e-3, 1e3, 1],
    tasks=[list(range(t, t + TASK)) for t in range(0, CLASSES, TASK)], top_k=1)


def _cpu_only(torch) -> None:
    """The release's `.cuda()` calls as no-ops, and no CUDA cache to empty."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.cuda.empty_cache = lambda: None


class _NoWeighting:
    dw = False  # the release's dataset flag: no class weighting (memory 0)


def _learner(torch, name: str, task: int):
    """The release's learner `name` as its trainer leaves it at the start of task `task`
    (1-based), with its optimizer and data weights."""
    module = {"NormalNN": "default", "AlwaysBeDreaming": "datafree"}[name]
    config = dict(LEARNER_CONFIG, batch_size=FLAGS.batch_size,
                  gpuid=[0] if FLAGS.device == "cuda" else [-1])
    learner = getattr(importlib.import_module(f"learners.{module}"), name)(config)
    learner.log = lambda *args, **kwargs: None
    if FLAGS.device == "cpu":
        learner.gpu = True  # the release's code paths of a GPU run, on the CPU
    learner.last_valid_out_dim = (task - 1) * TASK
    learner.valid_out_dim = task * TASK
    learner.data_weighting(_NoWeighting())
    learner.init_optimizer()
    learner.model.train()
    return learner


def _batch(torch, n: int, lo: int, hi: int, device):
    x = torch.randn(n, 3, 32, 32, device=device)
    y = torch.randint(lo, hi, (n,), device=device)
    return x, y


def _teacher(torch, learner, train: bool, iters: int = 0):
    from learners.datafree_helper import Teacher
    return Teacher(solver=copy.deepcopy(learner.model), generator=learner.generator,
                   gen_opt=learner.generator_optimizer, img_shape=(-1, 3, 32, 32), iters=iters,
                   deep_inv_params=LEARNER_CONFIG["deep_inv_params"],
                   class_idx=np.arange(learner.last_valid_out_dim), train=train,
                   config=learner.config)


def make_steps(torch, case: str, device):
    """`run(n)`: n release steps of `case`."""
    if case == "ce":
        learner = _learner(torch, "NormalNN", task=1)
        x, y = _batch(torch, FLAGS.batch_size, 0, TASK, device)
        return lambda n: [learner.update_model(x, y) for _ in range(n)]
    learner = _learner(torch, "AlwaysBeDreaming", task=2)
    if case == "generator":  # task 1's model inverted: n iterations in one call, as the release
        learner.last_valid_out_dim = TASK  # (each call empties the CUDA cache twice)
        teacher = _teacher(torch, learner, train=True)
        return lambda n: teacher.get_images(bs=FLAGS.batch_size, epochs=n)
    learner.previous_teacher = _teacher(torch, learner, train=False)
    learner.previous_linear = copy.deepcopy(learner.model.last)
    learner.inversion_replay = True
    x, y = _batch(torch, FLAGS.batch_size, TASK, 2 * TASK, device)

    def abd_step():  # the body of DeepInversionGenBN.learn_batch's loop
        teacher = learner.previous_teacher
        x_replay, y_replay, y_replay_hat = learner.sample(teacher, len(x), device)
        y_hat = teacher.generate_scores(x, allowed_predictions=np.arange(
            learner.last_valid_out_dim))
        _, y_hat_com = learner.combine_data(((x, y_hat), (x_replay, y_replay_hat)))
        x_com, y_com = learner.combine_data(((x, y), (x_replay, y_replay)))
        return learner.update_model(x_com, y_com, y_hat_com, dw_force=None,
                                    kd_index=np.arange(len(x), len(x_com)))
    return lambda n: [abd_step() for _ in range(n)]


def measure(torch, run) -> list[float]:
    """ms per step of each of FLAGS.repeats measurements (the device synchronised)."""
    sync = torch.cuda.synchronize if FLAGS.device == "cuda" else (lambda: None)
    run(FLAGS.warmup)
    sync()
    out = []
    for _ in range(FLAGS.repeats):
        tic = time.perf_counter()
        run(FLAGS.steps)
        sync()
        out.append(1e3 * (time.perf_counter() - tic) / FLAGS.steps)
    return out


def main(argv):
    del argv
    if importlib.util.find_spec("learners") is None:
        raise app.UsageError("the release's modules are not importable: run with "
                             "PYTHONPATH=<checkout of GT-RIPL/AlwaysBeDreaming-DFCIL>")
    import torch
    if FLAGS.device == "cpu":
        _cpu_only(torch)
    else:
        torch.backends.cudnn.benchmark = True  # as the release's run_dfcil.py sets it
    device = torch.device(FLAGS.device)
    name = torch.cuda.get_device_name(0) if FLAGS.device == "cuda" else "cpu"
    print(f"PyTorch release steps, ResNet-32 batch {FLAGS.batch_size}: torch "
          f"{torch.__version__} on {name}")
    rows = []
    for case in FLAGS.cases:
        torch.manual_seed(0)
        ms = measure(torch, make_steps(torch, case, device))
        rows.append({"case": case, "ms": ms, "ms_median": statistics.median(ms),
                     "ms_min": min(ms), "ms_max": max(ms)})
        print(f"  {case:10s} median {rows[-1]['ms_median']:8.2f} ms  (min {min(ms):.2f}, "
              f"max {max(ms):.2f}; {FLAGS.repeats} x {FLAGS.steps} steps)")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}, f,
                      indent=2)


if __name__ == "__main__":
    app.run(main)
