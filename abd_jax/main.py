"""Run a class-incremental experiment.

    python -m abd_jax.main --config=configs/cifar100.py --workdir=runs/c100 \
        [--config.method=lwf --config.num_tasks=5 ...]
    python -m abd_jax.main --config=configs/cifar100.py --show_config   # settings, methods

Rerunning the same command resumes from the newest checkpoint in --workdir. Several hosts
run the same command (docs/hosts.md).
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from abd_jax import config as config_lib
from abd_jax import errors, experiment, hosts, logs
from abd_jax.session import Session

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and results go (resumes if present).")
flags.DEFINE_bool("show_config", False, "Print every setting of --config (with overrides) and "
                  "the methods, then exit.")
flags.DEFINE_list("allow_changed", [], "Result fields a resumed run may change, logged (e.g. "
                  f"lr after a divergence); one of {', '.join(config_lib.CHANGEABLE)}.")
flags.DEFINE_bool("multihost", False, "Join a multi-process run (jax.distributed.initialize); "
                  "implied by --coordinator_address and by an srun/mpirun launch of several "
                  "processes or JAX_COORDINATOR_ADDRESS.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator "
                    "(default: $JAX_COORDINATOR_ADDRESS or the cluster's).")
flags.DEFINE_integer("num_processes", None, "Processes in the run (default: "
                     "$JAX_NUM_PROCESSES or the cluster's).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) "
                     "(default: $JAX_PROCESS_ID or the cluster's).")
flags.mark_flags_as_required(["config"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with one line naming the fix for a missing config file or an unknown
    or renamed `--config.<field>` (ml_collections raises those as tracebacks)."""
    try:
        argv = app.parse_flags_with_usage(argv)
        FLAGS.config.get("method")  # loads the file; a missing one fails here
    except (AttributeError, KeyError) as err:
        sys.exit(config_lib.unknown_setting_message(str(err), argv))
    except OSError as err:
        reason = [line.strip() for line in str(err).splitlines() if "Errno" in line]
        sys.exit(f"error: cannot load --config: {reason[0] if reason else err}; pass one of "
                 "configs/*.py")
    return argv


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.show_config:
        print(config_lib.describe(FLAGS.config))
        return
    try:
        config_lib.check_method_name(FLAGS.config)
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    if not FLAGS.workdir:
        raise SystemExit("error: pass --workdir=<folder> (where checkpoints and results go; a "
                         "rerun with the same folder resumes)")
    logs.quiet_library_logs()
    if FLAGS.multihost or FLAGS.coordinator_address or hosts.launched_as_several():
        hosts.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        if not hosts.is_main():  # process 0 reports; the others only warn
            logging.set_verbosity(logging.WARNING)
    with Session() as session:
        # SIGTERM (cluster pre-emption, `kill`) and Ctrl-C only set a flag; the loops stop at
        # the next jitted call, save a checkpoint and exit 130; a second signal exits at once.
        session.stop.install()
        try:
            experiment.run(FLAGS.config, FLAGS.workdir, session=session,
                           allow_changed=tuple(FLAGS.allow_changed))
        except KeyboardInterrupt:
            logging.warning("stopped; rerun the same command to resume from %s", FLAGS.workdir)
            raise SystemExit(130)
        except Exception as err:  # noqa: BLE001 (a failure the user can fix is one line)
            message = errors.one_line(err)
            if message is None:
                raise
            raise SystemExit(message) from None


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
