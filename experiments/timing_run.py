"""Time the whole task loop (compilation, training, synthesis, evaluation, checkpoints) on
random data shaped like the configured dataset, so no dataset is needed.

    python experiments/timing_run.py --config=configs/cifar100.py --workdir=/tmp/timing \
        --config.epochs=25 --config.synthesis.iterations=1000

Accuracies are meaningless (random images and labels); the printed wall times are not. The
run also writes the usual results files (with per-task wall times) to --workdir. SIGTERM or
Ctrl-C stops it at the next jitted call with a checkpoint (exit 130); the same command resumes
it, so a run longer than one sitting is timed as consecutive segments
(`experiments/full_run_gpu.sh`).
"""
from __future__ import annotations

import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from abd_jax import data, experiment, logs
from abd_jax.session import Session

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Output folder (must not hold another run).")
flags.DEFINE_integer("train_per_class", 500, "Random training images per class.")
flags.DEFINE_integer("test_per_class", 100, "Random test images per class.")
flags.mark_flags_as_required(["config", "workdir"])


def random_splits(config) -> experiment.Splits:
    spec = data.spec_of(config)
    rng = np.random.RandomState(0)

    def split(per_class):
        labels = np.repeat(np.arange(spec.num_classes, dtype=np.int32), per_class)
        images = rng.randint(0, 256, (len(labels), *spec.image_shape)).astype(np.uint8)
        return images, labels

    return experiment.Splits(spec, *split(FLAGS.train_per_class), *split(FLAGS.test_per_class))


def main(argv):
    del argv
    logs.quiet_library_logs()
    tic = time.time()
    with Session() as session:
        session.stop.install()
        try:
            results = experiment.run(FLAGS.config, FLAGS.workdir, random_splits(FLAGS.config),
                                     session)
        except KeyboardInterrupt:
            print(f"stopped after {time.time() - tic:.1f} s with a checkpoint; the same "
                  "command resumes it")
            raise SystemExit(130)
    total = time.time() - tic
    rep = results["repeats"][0]
    print(f"method {FLAGS.config.method}, {FLAGS.config.num_tasks} tasks, "
          f"{FLAGS.config.epochs} epochs/task, {FLAGS.config.synthesis.iterations} generator "
          f"iterations/task, batch {FLAGS.config.batch_size}")
    print("wall seconds per task:", [round(s, 1) for s in rep["task_wall_seconds"]])
    seconds = rep["train_seconds_per_batch"]  # None when every loop was one call
    print("seconds per training batch:", "n/a" if seconds is None else f"{seconds:.5f}")
    print(f"wall time of this process's run: {total:.1f} s; peak memory "
          f"{rep['peak_memory_bytes'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    app.run(main)
