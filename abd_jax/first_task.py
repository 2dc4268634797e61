"""A run's finished first task, shared: a run of a method whose backbone freezes after the
first task keeps its trained first-task model in `<workdir>/first_task/repeat_<r>/`, and a
run with `--config.first_task_from=<that workdir>` starts from it instead of training its
own, when everything that shapes the first task is the same (`fingerprint`): a table trains
the first task once per seed."""
from __future__ import annotations

import json
import pathlib

import ml_collections

from abd_jax import checkpoint as ckpt_lib
from abd_jax import data as data_lib
from abd_jax import methods, plan

FOLDER = "first_task"
# The run-wide settings that decide the first task's model (beside its schedule, weight
# decay and loss, which the method decides).
SETTINGS = ("dataset", "image_size", "num_classes", "train_per_class", "class_order", "seed",
            "model", "head", "dtype", "conv_impl", "batch_size", "momentum", "lr_decay",
            "augment")


def fingerprint(config, method, spec: data_lib.DatasetSpec) -> dict:
    """What the first task's trained model depends on: `SETTINGS`, its classes, and the
    method's schedule, weight decay and loss for it (JSON-comparable)."""
    first = plan.Task(index=0, num_tasks=config.num_tasks, num_old=0,
                      num_seen=data_lib.task_boundaries(
                          config.num_classes or spec.num_classes, config.num_tasks,
                          config.get("first_task_classes", 0))[0][1])
    schedule = method.schedule(config, first)
    loss = method.loss_fn(first)
    out = {k: config.get(k) for k in SETTINGS}
    out.update(first_task_classes=first.num_seen, epochs=schedule.epochs, lr=schedule.lr,
               milestones=list(schedule.milestones), cosine=schedule.cosine,
               weight_decay=method.weight_decay(config),
               loss=getattr(loss, "__name__", type(loss).__name__))
    return json.loads(json.dumps(out, default=lambda v: v.to_dict()))


def check_source(config, method, spec: data_lib.DatasetSpec) -> None:
    """Refuse, in one line naming what differs, a `first_task_from` whose run trained its
    first task otherwise; no-op when it is unset."""
    source = config.get("first_task_from", "")
    if not source:
        return
    path = data_lib.expand_path(source) / "config.json"
    if not path.exists():
        raise ValueError(f"first_task_from={source}: no run there ({path} is missing); pass "
                         "the workdir of a run whose first task is finished")
    other = ml_collections.ConfigDict(json.loads(path.read_text()))
    theirs = fingerprint(other, methods.get_method(other, spec), spec)
    ours = fingerprint(config, method, spec)
    differ = [f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in ours
              if ours[k] != theirs.get(k)]
    if differ:
        raise ValueError(f"first_task_from={source}: its first task was trained otherwise ("
                         + "; ".join(differ) + "); drop --config.first_task_from or match it")


def _checkpointer(workdir, repeat: int) -> ckpt_lib.RunCheckpointer:
    return ckpt_lib.RunCheckpointer(pathlib.Path(workdir) / FOLDER / f"repeat_{repeat}")


def save(workdir, repeat: int, learner) -> None:
    """Keep repeat `repeat`'s trained first-task model (params and running statistics)."""
    checkpointer = _checkpointer(workdir, repeat)
    checkpointer.save(1, 0, {"params": learner.params, "batch_stats": learner.batch_stats},
                      {"accuracy": None})  # (a run's checkpoint meta; not measured yet)
    checkpointer.close()


def load(source, repeat: int, learner):
    """`learner` with the params and running statistics of the first task kept in the
    workdir `source`, repeat `repeat`."""
    directory = data_lib.expand_path(source) / FOLDER / f"repeat_{repeat}"
    if not directory.exists():
        raise FileNotFoundError(f"first_task_from={source}: it has no finished first task for "
                                f"repeat {repeat} ({directory}); run that repeat there first")
    checkpointer = _checkpointer(data_lib.expand_path(source), repeat)
    restored = checkpointer.restore_at(1, 0, {"params": learner.params,
                                              "batch_stats": learner.batch_stats})[0]
    checkpointer.close()
    return learner.replace(params=restored["params"], batch_stats=restored["batch_stats"])
