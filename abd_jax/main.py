"""Run a class-incremental experiment.

    python -m abd_jax.main --config=configs/cifar100.py --workdir=runs/c100 \
        [--config.method=lwf --config.num_tasks=5 ...]

Rerunning the same command resumes from the newest checkpoint in --workdir.

Several hosts run the same command, each with `--multihost` (or under a launcher that
`hosts.launched_as_several` recognises, or with an explicit `--coordinator_address`,
`--num_processes`, `--process_id`); see README, "Several hosts".
"""
from __future__ import annotations

import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from abd_jax import checkpoint as ckpt_lib
from abd_jax import experiment
from abd_jax import hosts
from abd_jax import logs
from abd_jax import preemption

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and results go (resumes if present).")
flags.DEFINE_bool("multihost", False, "Join a multi-process run (jax.distributed.initialize); "
                  "implied by --coordinator_address and by an srun/mpirun launch of several "
                  "processes or JAX_COORDINATOR_ADDRESS.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator "
                    "(default: $JAX_COORDINATOR_ADDRESS or the cluster's).")
flags.DEFINE_integer("num_processes", None, "Processes in the run (default: "
                     "$JAX_NUM_PROCESSES or the cluster's).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) "
                     "(default: $JAX_PROCESS_ID or the cluster's).")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with one line naming the fix for a missing config file or an unknown
    `--config.<field>` (ml_collections raises those as tracebacks)."""
    try:
        argv = app.parse_flags_with_usage(argv)
        FLAGS.config.get("method")  # loads the file; a missing one fails here
    except (AttributeError, KeyError) as err:
        sys.exit(unknown_setting_message(str(err), argv))
    except OSError as err:
        reason = [line.strip() for line in str(err).splitlines() if "Errno" in line]
        sys.exit(f"error: cannot load --config: {reason[0] if reason else err}; pass one of "
                 "configs/*.py")
    return argv


def unknown_setting_message(error: str, argv: list[str]) -> str:
    """'error: unknown setting --config.<path> ...' from ml_collections' KeyError text."""
    field = re.search(r"[\w.]+", error.replace("\\'", "'"))
    field = field.group(0) if field else error
    given = [arg.split("=")[0] for arg in argv
             if arg.startswith("--config.") and arg.split("=")[0].endswith(field)]
    hint = re.search(r'Did you mean "([\w.]+)"', error)
    fix = (f"did you mean {hint.group(1)!r}?" if hint else
           "see configs/*.py for the settings a config has")
    return (f"error: unknown setting {given[0] if given else '--config.' + field}: the "
            f"config has no field {field!r}; {fix}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logs.quiet_library_logs()
    if FLAGS.multihost or FLAGS.coordinator_address or hosts.launched_as_several():
        hosts.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        if not hosts.is_main():  # process 0 reports; the others only warn
            logging.set_verbosity(logging.WARNING)
    # SIGTERM (cluster pre-emption, `kill`) and Ctrl-C only set a flag; the loops stop at the
    # next jitted call, save a checkpoint and exit 130; a second signal exits at once.
    preemption.install()
    logging.debug("config:\n%s", FLAGS.config)  # (all of it is in <workdir>/config.json)
    try:
        experiment.run(FLAGS.config, FLAGS.workdir)
    except KeyboardInterrupt:
        logging.warning("stopped; rerun the same command to resume from %s", FLAGS.workdir)
        raise SystemExit(130)
    except (ValueError, FileNotFoundError, FloatingPointError, ckpt_lib.WorkdirBusy) as err:
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
