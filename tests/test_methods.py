"""The method lifecycle: the task loop names no method; a method's hooks and typed state
plug into it, are checkpointed with it and resume exactly."""
import pathlib
import tokenize

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from abd_jax import checkpoint as ckpt_lib
from abd_jax import experiment, losses, methods, models, services, train
from abd_jax.methods import base, lifecycle
from configs import digits
from helpers import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["experiment.py", "runner.py", "services.py", "driver.py", "plan.py"])
def test_the_task_loop_names_no_method(module):
    """No identifier of the task loop's modules, and no string literal equal to a method's
    name, refers to a method (messages may mention one, e.g. how to produce Omega's
    denominators)."""
    path = REPO / "abd_jax" / module
    with path.open("rb") as f:
        tokens = list(tokenize.tokenize(f.readline))
    names = {t.string for t in tokens if t.type == tokenize.NAME}
    strings = {t.string.strip("\"'") for t in tokens if t.type == tokenize.STRING}
    method_words = set(methods.METHODS) | {"ABD", "DeepInversion", "LwF", "LwFMC", "Base",
                                           "UpperBound", "Synthesizer", "synthesis",
                                           "teacher", "generator"}
    assert not names & method_words
    assert not strings & set(methods.METHODS)


@pytest.mark.parametrize("name", methods.METHODS)
def test_every_method_builds_with_its_first_and_later_losses(name):
    config = digits.get_config()
    config.method = name
    method = methods.get_method(config)
    first = method.loss_fn(methods.Task(0, 5, 0, 2))
    later = method.loss_fn(methods.Task(1, 5, 2, 4))
    assert method.loss_fn(methods.Task(2, 5, 4, 6)) is later  # one compilation for tasks > 1
    if name in ("base", "upper_bound", "naive_rehearsal"):
        assert first is later is base.ce
    elif not method.trains(methods.Task(1, 5, 2, 4)):  # a backbone frozen after task 1
        assert method.trains(methods.Task(0, 5, 0, 2)) and first is base.ce
    elif name == "lwf_mc":
        assert first is not later and first is not base.ce
    else:
        assert first is base.ce and later is not base.ce


def _ctx(model, params, batch_stats, x, y, inputs=None):
    def forward(images):
        (logits, feats), upd = model.apply({"params": params, "batch_stats": batch_stats},
                                           images, train=True, mutable=["batch_stats"])
        return logits, feats, upd["batch_stats"]

    return train.LossContext(forward=forward, model=model, params=params,
                             batch_stats=batch_stats,
                             inputs=inputs, images=x, labels=y,
                             num_old=jnp.int32(0), num_seen=jnp.int32(4),
                             rng=jax.random.PRNGKey(0))


@pytest.mark.slow
def test_lwf_mc_trains_its_first_task_with_bce(session):
    config = digits.get_config()
    config.method = "lwf_mc"
    method = methods.get_method(config)
    model = models.CifarResNet(depth=8, num_classes=6, width=4)
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 8, 8, 1))
    y = jnp.array([0, 1, 2, 3, 1])
    v = models.init_variables(session, model, jax.random.PRNGKey(2), x[:1])

    @jax.jit
    def first_task_loss(v, x, y):
        ctx = _ctx(model, v["params"], v["batch_stats"], x, y)
        loss, _, metrics = method.loss_fn(methods.Task(0, 3, 0, 4))(ctx)
        return loss, metrics, ctx.forward(x)[0]

    loss, metrics, logits = first_task_loss(v, x, y)
    np.testing.assert_allclose(loss, losses.lwf_mc_loss(logits, y, None, num_valid=4),
                               rtol=1e-6)
    assert set(metrics) == {"bce"}
    assert abs(float(loss) - float(losses.valid_ce_loss(logits, y, 4))) > 1e-3


@struct.dataclass
class CountState:
    """A test method's state: how many tasks ended, and a running sum of the teacher's head."""

    tasks_ended: jax.Array
    head_sum: jax.Array


class CountingMethod(lifecycle.Method):
    """Base's loss with a typed state of its own, updated at every task end."""

    name = "counting"

    def init_state(self, rt, learner):
        return CountState(tasks_ended=jnp.int32(0), head_sum=jnp.float32(0))

    def loss_fn(self, task):
        return base.ce

    def end_task(self, task):
        return [lifecycle.Update("count", self.count)]

    def count(self, rt, learner, state, task):
        rt.services.log(task.index, {"ended": 1.0}, task=task.index + 1, phase="counting")
        return learner, CountState(state.tasks_ended + 1,
                                   state.head_sum + jnp.sum(learner.params["head"]["kernel"]))


@pytest.mark.slow
def test_a_new_method_plugs_in_and_its_state_is_checkpointed(digits_data_dir, tmp_path,
                                                             monkeypatch, session):
    monkeypatch.setitem(methods._CLASSES, "counting", CountingMethod)
    monkeypatch.setattr(methods, "METHODS", (*methods.METHODS, "counting"))
    config = tiny_config(digits_data_dir, method="counting", epochs=1)
    results = experiment.run(config, tmp_path, session=session)
    assert len(results["repeats"][0]["A_global"]) == 5
    ckpt = ckpt_lib.RunCheckpointer(tmp_path / "checkpoints" / "repeat_0")
    assert ckpt.latest() == (5, 0)
    learner = train.create_train_state(session, models.create_classifier("resnet8", 10),
                                       jax.random.PRNGKey(0), (8, 8, 1),
                                       train.learner_optimizer(session, 0.05, 0.9, 2e-4))
    _, restored, _ = ckpt.restore_latest({"state": learner,
                                          "method": CountState(jnp.int32(0), jnp.float32(0))})
    assert int(restored["method"].tasks_ended) == 5
    assert float(restored["method"].head_sum) != 0.0
    ckpt.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert sum('"phase": "counting"' in line for line in lines) == 5


@pytest.mark.slow
def test_interrupted_synthesis_resumes_to_identical_results(digits_data_dir, tmp_path,
                                                            monkeypatch, session):
    """An exception (as a crash) inside the generator training after task 2, after its
    progress checkpoint at iteration 10 of 20: the rerun continues that stage from the saved
    generator."""
    config = tiny_config(digits_data_dir, method="abd", epochs=1, num_tasks=5)
    config.synthesis.checkpoint_every = 10
    reference = experiment.run(config, tmp_path / "straight", session=session)
    real = services.RepeatServices.log

    def crashing(self, step, scalars, **tags):
        if tags.get("phase") == "generator" and tags.get("task") == 2 and step == 20:
            raise KeyboardInterrupt  # at its last log, after the checkpoint at 10
        return real(self, step, scalars, **tags)

    monkeypatch.setattr(services.RepeatServices, "log", crashing)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(config, tmp_path / "resumed", session=session)
    monkeypatch.setattr(services.RepeatServices, "log", real)
    checkpointer = ckpt_lib.RunCheckpointer(tmp_path / "resumed" / "checkpoints" / "repeat_0")
    assert checkpointer.latest() == (1, ckpt_lib.stage_step(0, 10))  # task 2's generator
    checkpointer.close()
    resumed = experiment.run(config, tmp_path / "resumed", session=session)
    assert [r["R_global"] for r in resumed["repeats"]] == [
        r["R_global"] for r in reference["repeats"]]
