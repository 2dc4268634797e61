"""Run a class-incremental experiment.

    python -m abd_jax.main --config=configs/cifar100.py --workdir=runs/c100 \
        [--config.method=lwf --config.num_tasks=5 ...]

Rerunning the same command resumes from the newest checkpoint in --workdir.
"""
from __future__ import annotations

import signal

from absl import app, flags, logging
from ml_collections import config_flags

from abd_jax import checkpoint as ckpt_lib
from abd_jax import experiment

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and results go (resumes if present).")
flags.mark_flags_as_required(["config", "workdir"])


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    ckpt_lib.quiet_orbax_info_logs()
    # SIGTERM (cluster pre-emption, `kill`) takes the same path as Ctrl-C: checkpoint, exit.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    logging.info("config:\n%s", FLAGS.config)
    try:
        experiment.run(FLAGS.config, FLAGS.workdir)
    except KeyboardInterrupt:
        logging.warning("stopped; rerun the same command to resume from %s", FLAGS.workdir)
        raise SystemExit(130)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    app.run(main)
