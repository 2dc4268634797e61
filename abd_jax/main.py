"""Run a class-incremental experiment.

    python -m abd_jax.main --config=configs/cifar100.py --workdir=runs/c100 \
        [--config.method=lwf --config.num_tasks=5 ...]

Rerunning the same command resumes from the newest checkpoint in --workdir.
"""
from __future__ import annotations

import logging as py_logging
import signal

from absl import app, flags, logging
from ml_collections import config_flags

from abd_jax import experiment

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and results go (resumes if present).")
flags.mark_flags_as_required(["config", "workdir"])


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _quiet_orbax(record: py_logging.LogRecord) -> bool:
    """Orbax logs every checkpoint write at INFO; keep its warnings and errors only."""
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_quiet_orbax)
    # SIGTERM (cluster pre-emption, `kill`) takes the same path as Ctrl-C: checkpoint, exit.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    logging.info("config:\n%s", FLAGS.config)
    try:
        experiment.run(FLAGS.config, FLAGS.workdir)
    except KeyboardInterrupt:
        logging.warning("stopped; rerun the same command to resume from %s", FLAGS.workdir)
        raise SystemExit(130)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        logging.error("%s", err)
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    app.run(main)
