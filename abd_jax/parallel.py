"""Several runs at once on one machine, each in a process of its own with its share of each
accelerator's memory (`experiments/run_table.py --parallel=N`).

A run of R > 1 repeats becomes R runs of one repeat each, in `<workdir>/repeat_<r>/` with
`first_repeat = r`: repeat r's seed, class order and numbers, as in the whole run. Once all R
are done they are merged into `<workdir>`'s results.json, summary.md and accuracy.png, with
the numbers a run of all R in one process gives. A run of one repeat runs in its workdir as
it would alone.

Each job is a fresh Python process (spawned), in a process group of its own, writing its log
to a file. It takes an even share of 90% of each accelerator's memory
(`XLA_PYTHON_CLIENT_MEM_FRACTION`). A stop (Ctrl-C, SIGTERM) to the caller is passed on to
every running job through a pipe, as a stop request: the job saves a checkpoint and exits,
as on a signal of its own (a job that also got the signal itself counts it once); a second
stop to the caller ends the jobs at once. A job whose caller dies stops the same way.
Rerunning resumes each job from its own checkpoint, and skips finished ones.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import multiprocessing.connection
import os
import pathlib
import signal
import sys
import threading
import traceback
from typing import Callable

import ml_collections

from abd_jax import config as config_lib
from abd_jax import experiment, metrics, reporting

EXIT_STOPPED = 130  # as `python -m abd_jax.main` after a stop request


@dataclasses.dataclass(frozen=True)
class Job:
    """One process's run: `experiment.run(config, workdir, allow_changed=allow_changed)`,
    logged to `log`."""

    name: str
    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    log: pathlib.Path
    allow_changed: tuple = ()


class JobFailed(RuntimeError):
    """A job ended with an error (its message and log named)."""


def repeat_jobs(name: str, config, workdir: pathlib.Path, log_dir: pathlib.Path,
                allow_changed: tuple = ()) -> list[Job]:
    """The jobs of a run: itself when it has one repeat, else one job per repeat r in
    `workdir/repeat_<r>` (`config.repeats = 1`, `config.first_repeat = r`)."""
    workdir, log_dir = pathlib.Path(workdir), pathlib.Path(log_dir)
    if config.repeats == 1:
        return [Job(name, config, workdir, log_dir / f"{_file_name(name)}.log", allow_changed)]
    return [Job(f"{name}, repeat {r}",
                experiment.config_with(config, {"repeats": 1, "first_repeat": r}),
                workdir / f"repeat_{r}", log_dir / f"{_file_name(name)}_repeat{r}.log",
                allow_changed)
            for r in config_lib.repeat_indices(config)]


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def merge_repeats(config, workdir: pathlib.Path) -> dict:
    """The results of `config`'s run in `workdir` from its one-repeat runs (`repeat_jobs`),
    written (R > 1) as that run's results.json, summary.md and accuracy.png."""
    workdir = pathlib.Path(workdir)
    if config.repeats == 1:
        return json.loads((workdir / "results.json").read_text())
    runs = [json.loads((workdir / f"repeat_{r}" / "results.json").read_text())["repeats"][0]
            for r in config_lib.repeat_indices(config)]
    upper_bound = (json.loads(pathlib.Path(config.upper_bound_results).expanduser().read_text())
                   if config.upper_bound_results else None)
    results = metrics.build_results(runs, upper_bound)
    reporting.write_results(workdir, results, json.loads(config.to_json()),
                            experiment.run_title(config))
    return results


def finished(config, workdir: pathlib.Path) -> bool:
    """Whether `workdir` holds the finished run of `config`: a results.json of all its
    repeats, with the settings that decide the numbers equal to `config`'s (a run in one
    process, or one merged by `merge_repeats`)."""
    try:
        results = json.loads((pathlib.Path(workdir) / "results.json").read_text())
    except (OSError, ValueError):
        return False
    fields = config_lib.result_fields
    return (results.get("num_repeats") == config.repeats
            and fields(results.get("config", {})) == fields(json.loads(config.to_json())))


def run_jobs(jobs: list[Job], processes: int, on_done: Callable[[Job, bool], None]) -> None:
    """Run `jobs`, `processes` at a time, in their order; `on_done(job, ran)` after each one
    ends (`ran` False for one found finished). A stop request (SIGINT, SIGTERM) is passed on
    to the running jobs once per request and starts no more; then KeyboardInterrupt (also
    when a job was stopped by a signal of its own). A job that fails stops the others the
    same way (each saves a checkpoint); then JobFailed naming it, its error and its log."""
    memory_fraction = round(0.9 / processes, 3)  # each job's share: 90% split evenly
    context = multiprocessing.get_context("spawn")
    pending = list(jobs)
    running: dict = {}  # process -> (job, (its control pipe's end, its error pipe's end))
    stops, failure = [0], None

    def pass_on(signum, frame):
        stops[0] += 1
        for _, (control, _) in running.values():
            _send(control, "stop" if stops[0] == 1 else "exit")

    previous = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while pending or running:
            while pending and len(running) < processes and not stops[0] and failure is None:
                job = pending.pop(0)
                if finished(job.config, job.workdir):
                    on_done(job, False)
                    continue
                job.log.parent.mkdir(parents=True, exist_ok=True)
                control_receive, control = context.Pipe(duplex=False)
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_job_main, name=job.name, args=(
                    job.config, str(job.workdir), str(job.log), job.allow_changed,
                    memory_fraction, control_receive, send))
                process.start()
                control_receive.close()
                send.close()
                running[process] = (job, (control, receive))
            if not running:
                break
            multiprocessing.connection.wait([p.sentinel for p in running])
            for process in [p for p in running if not p.is_alive()]:
                process.join()
                job, (control, receive) = running.pop(process)
                message = _received(receive)
                control.close()
                receive.close()
                if process.exitcode == 0:
                    on_done(job, True)
                elif process.exitcode == EXIT_STOPPED:
                    if not stops[0]:  # a signal of its own (a cluster stopping every process)
                        pass_on(None, None)
                elif failure is None:
                    failure = (job, message or f"its process ended with status "
                               f"{process.exitcode}")
                    pass_on(None, None)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for process, (_, (control, receive)) in running.items():  # after an error here
            _send(control, "stop")
            process.join()
            control.close()
            receive.close()
    if failure is not None:
        job, message = failure
        raise JobFailed(f"{job.name}: {message} (its log: {job.log}); rerun the same command "
                        "to resume the others")
    if stops[0]:
        raise KeyboardInterrupt


def _received(receive):
    """The job's error message, or None when it sent none."""
    try:
        return receive.recv() if receive.poll() else None
    except EOFError:
        return None


def _send(control, command: str) -> None:
    try:
        control.send(command)
    except (BrokenPipeError, OSError):
        pass  # the job has just ended


def _job_main(config, workdir: str, log: str, allow_changed: tuple, memory_fraction: float,
              control, errors_pipe) -> None:
    """A job's process: its own process group (a Ctrl-C to the terminal reaches it only
    through the caller), output to `log`, stop requests from `control`, then the run."""
    os.setpgrp()
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{memory_fraction:.3f}")
    with open(log, "a", buffering=1) as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    from absl import flags, logging

    from abd_jax import errors, logs
    from abd_jax.session import Session
    flags.FLAGS.mark_as_parsed()
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    logs.quiet_library_logs()
    with Session() as session:
        session.stop.install()
        threading.Thread(target=_follow, args=(control, session), daemon=True).start()
        try:
            experiment.run(config, workdir, session=session, allow_changed=allow_changed)
        except KeyboardInterrupt:
            logging.warning("stopped; rerunning the table resumes %s", workdir)
            sys.exit(EXIT_STOPPED)
        except Exception as err:  # noqa: BLE001 (reported to the caller in one line)
            message = errors.one_line(err)
            if message is None:
                traceback.print_exc()
                message = f"{type(err).__name__}: {err}".splitlines()[0]
            errors_pipe.send(message.removeprefix("error: "))
            sys.exit(1)


def _follow(control, session) -> None:
    """A job's thread: "stop" (or the caller's end closing: it died) is a stop request, as
    a signal's; "exit" ends the process at once, as a second signal does."""
    while True:
        try:
            command = control.recv()
        except (EOFError, OSError):
            command = None
        if command == "exit":
            os._exit(EXIT_STOPPED)
        if session.stop.signal is None:
            session.stop.request()
        if command is None:
            return
