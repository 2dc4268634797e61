"""The exemplar-free methods on a frozen first-task backbone (docs/algorithm.md §11): NCM,
FeCAM and FeTrIL as the task loop calls them: the first task's recipe, the statistics stage,
the scores they classify with, FeTrIL's feature training set and head step, and the shared
first task (`--config.first_task_from`)."""
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abd_jax import data, experiment, first_task, losses, methods, sampling, train
from abd_jax.methods import fetril
from configs import digits
from helpers import tiny_config

D, C = 3, 4


class FakePlan:
    """2 tasks of 2 classes, 4 classes x 10 toy examples."""

    train_labels = np.repeat(np.arange(C), 10).astype(np.int32)
    num_tasks = 2

    def task_indices(self, t):
        return np.flatnonzero((self.train_labels >= 2 * t) & (self.train_labels < 2 * t + 2))


class FakeServices:
    """Fixed positive toy features (as after a ReLU)."""

    features = np.random.RandomState(1).rand(40, D) + 0.05

    def predict_train(self, learner, index):
        return np.zeros((len(index), C)), self.features[index]


def _setup(name, session, **overrides):
    config = digits.get_config()
    config.method, config.num_tasks, config.num_classes = name, 2, C
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    method = methods.get_method(config)
    rt = types.SimpleNamespace(config=config, plan=FakePlan(), services=FakeServices(),
                               session=session, method_key=np.array([0, 3], np.uint32),
                               steps_per_call=1)
    learner = types.SimpleNamespace(params={"head": {"kernel": np.zeros((D, C), np.float32),
                                                     "bias": np.zeros((C,), np.float32)}})
    return config, method, rt, learner


def _task(t):
    return methods.Task(index=t, num_tasks=2, num_old=2 * t, num_seen=2 * t + 2)


def _through(method, rt, learner, state, task):
    """The task's statistics stage, as the task loop runs an `Update`."""
    stage, = [s for s in method.end_task(task) if isinstance(s, methods.Update)][:1]
    return stage.fn(rt, learner, state, task)[1]


@pytest.mark.parametrize("name", ["ncm", "fecam", "fetril"])
def test_the_first_task_alone_trains_with_its_recipe(name, session):
    """Only the first task has a training loop: CE, the first_task subtree's epochs, rate
    and weight decay, a cosine schedule."""
    config, method, _, _ = _setup(name, session)
    assert method.trains(_task(0)) and not method.trains(_task(1))
    schedule = method.schedule(config, _task(0))
    ft = config.first_task
    assert (schedule.epochs, schedule.lr, schedule.cosine) == (ft.epochs, ft.lr, True)
    assert method.weight_decay(config) == ft.weight_decay == 5e-4
    assert method.keeps_first_task and "first_task" in method.sections


def test_ncm_keeps_the_class_means_and_scores_unit_vectors(session):
    _, method, rt, learner = _setup("ncm", session)
    state = method.init_state(rt, learner)
    for t in (0, 1):
        state = _through(method, rt, learner, state, _task(t))
    f, y = FakeServices.features, FakePlan.train_labels
    want = np.stack([f[y == c].mean(axis=0) for c in range(C)])
    np.testing.assert_allclose(state.means, want, rtol=1e-6)
    test = np.random.RandomState(2).rand(5, D).astype(np.float32)
    logits = np.full((5, C), 7.0, np.float32)
    rt.config.eval_batch_size = 2  # scored in chunks of 2
    got = method.eval_logits(rt, state, logits, test, _task(1))
    np.testing.assert_allclose(got, losses.ncm_scores(test, state.means, 4), rtol=1e-5)
    # after the first task: the cosine classifier's logits
    np.testing.assert_array_equal(method.eval_logits(rt, state, logits, test, _task(0)), logits)


def test_fecam_keeps_each_class_precision_and_scores_by_mahalanobis(session):
    _, method, rt, learner = _setup("fecam", session)
    state = method.init_state(rt, learner)
    for t in (0, 1):
        state = _through(method, rt, learner, state, _task(t))
    f, y = FakeServices.features, FakePlan.train_labels
    for c in range(C):  # Tukey (beta 0.5) of the raw features, shrunk twice, a correlation
        np.testing.assert_allclose(state.precisions[c],
                                   losses.fecam_precision(np.sqrt(f[y == c])), rtol=1e-5)
    test = np.random.RandomState(2).rand(5, D).astype(np.float32)
    got = method.eval_logits(rt, state, np.zeros((5, C), np.float32), test, _task(1))
    want = losses.fecam_scores(test, state.means, state.precisions, 0.5, 4)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_fecam_shared_covariance_weighs_each_task_by_its_classes(session):
    """The code's `per_class: false`: the first task's covariance, then K_old / K_new of it
    plus (1 - K_old / K_new) of the new task's, shrunk once."""
    _, method, rt, learner = _setup("fecam", session, **{"fecam.shared_covariance": True})
    state = method.init_state(rt, learner)
    state = _through(method, rt, learner, state, _task(0))
    g = np.sqrt(FakeServices.features)
    first = np.cov(g[:20].T)
    np.testing.assert_allclose(state.shared, first, rtol=1e-5)
    state = _through(method, rt, learner, state, _task(1))
    second = losses.shrink_covariance(np.cov(g[20:].T))
    np.testing.assert_allclose(state.shared, 0.5 * first + 0.5 * second, rtol=1e-5)


def test_fetril_trains_on_real_and_translated_features(session):
    """After task 2: the new classes' real features, and each past class the features of
    the new class nearest to it, moved by the difference of the two means."""
    _, method, rt, learner = _setup("fetril", session)
    state = method.init_state(rt, learner)
    for t in (0, 1):
        state = _through(method, rt, learner, state, _task(t))
    x, y = fetril.training_features(rt, learner, state, _task(1), "euclidean")
    f, labels = FakeServices.features, FakePlan.train_labels
    means = np.asarray(state.means)
    np.testing.assert_array_equal(x[:20], f[20:])
    for p in (0, 1):
        n = 2 + int(np.argmin(((means[2:] - means[p]) ** 2).sum(-1)))
        np.testing.assert_allclose(x[y == p], f[labels == n] - means[n] + means[p], rtol=1e-6)
    assert len(x) == 40  # 20 real; each past class its nearest new class's 10, translated


def test_fetril_head_step_is_sgd_on_the_ce_of_the_batch(session):
    """One step of the linear head on features: the batch `sampling.batch_indices` draws,
    CE over the valid classes of x W + b, SGD at the cosine schedule's first rate."""
    rng = np.random.RandomState(0)
    features = jnp.asarray(rng.rand(16, D), jnp.float32)
    labels = jnp.asarray(rng.randint(0, 3, 16), jnp.int32)
    head = {"kernel": jnp.asarray(rng.randn(D, C), jnp.float32), "bias": jnp.zeros(C)}
    tx = train.learner_optimizer(session, 0.05, 0.0, 0.0)
    state = train.new_train_state(session, None, {"params": head}, tx)
    info = sampling.TaskInfo(
        index=jnp.arange(16, dtype=jnp.int32), count=jnp.int32(16), num_old=jnp.int32(0),
        num_seen=jnp.int32(3), steps_per_epoch=jnp.int32(4), total_steps=jnp.int32(8),
        key=jax.random.PRNGKey(3), base_lr=jnp.float32(0.05),
        lr_milestones=jnp.asarray(sampling.lr_milestones((), 1)), cosine_epochs=jnp.int32(2))
    new, metrics = jax.jit(fetril._head_step(4))(state, features, labels, info)
    chosen = np.asarray(sampling.batch_indices(info, 0, 4))
    x, y = np.asarray(features)[chosen], np.asarray(labels)[chosen]
    grad = jax.grad(lambda p: losses.valid_ce_loss(x @ p["kernel"] + p["bias"], y, 3))(head)
    np.testing.assert_allclose(new.params["kernel"], head["kernel"] - 0.05 * grad["kernel"],
                               rtol=1e-5, atol=1e-7)
    assert float(metrics["lr"]) == pytest.approx(0.05)


def test_a_first_task_trained_otherwise_is_refused_in_one_line(digits_data_dir, tmp_path):
    config = tiny_config(digits_data_dir, method="ncm", num_tasks=2)
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(config.to_json())
    other = experiment.config_with(config, {"method": "fecam",
                                            "first_task_from": str(source)})
    spec = data.spec_of(other)
    first_task.check_source(other, methods.get_method(other, spec), spec)  # the same: fine
    changed = experiment.config_with(other, {"first_task.epochs": 3, "model": "resnet14"})
    with pytest.raises(ValueError, match=r"first_task_from=.*trained otherwise \(model: "
                                         r"'resnet8' there, 'resnet14' here; epochs: 30 "
                                         r"there, 3 here\)"):
        first_task.check_source(changed, methods.get_method(changed, spec), spec)
    with pytest.raises(ValueError, match="no run there"):
        bad = experiment.config_with(other, {"first_task_from": str(tmp_path / "none")})
        first_task.check_source(bad, methods.get_method(bad, spec), spec)
    assert json.loads((source / "config.json").read_text())["method"] == "ncm"


@pytest.mark.slow
def test_a_shared_first_task_gives_the_numbers_of_training_it(digits_data_dir, tmp_path,
                                                              monkeypatch, session):
    """FeCAM from NCM's finished first task equals FeCAM trained alone, bit for bit (the same
    seed trains the same first task); and the statistics stage rerun after an interrupt
    inside it gives the same numbers."""
    config = tiny_config(digits_data_dir, method="ncm", num_tasks=3, num_classes=6,
                         head="cosine", **{"first_task": {**digits.get_config().first_task
                                                          .to_dict(), "epochs": 2}})
    experiment.run(config, tmp_path / "ncm", session=session)
    fecam = experiment.config_with(config, {"method": "fecam"})
    alone = experiment.run(fecam, tmp_path / "alone", session=session)
    shared = experiment.run(experiment.config_with(fecam, {
        "first_task_from": str(tmp_path / "ncm")}), tmp_path / "shared", session=session)
    assert shared["repeats"][0]["R_global"] == alone["repeats"][0]["R_global"]
    real, calls = methods.fecam.FeCAM.statistics, {"n": 0}

    def crashing(*args, **kwargs):  # inside task 2's statistics stage
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(methods.fecam.FeCAM, "statistics", crashing)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(fecam, tmp_path / "resumed", session=session)
    monkeypatch.setattr(methods.fecam.FeCAM, "statistics", real)
    resumed = experiment.run(fecam, tmp_path / "resumed", session=session)
    assert resumed["repeats"][0]["R_global"] == alone["repeats"][0]["R_global"]
    memory = alone["repeats"][0]["memory"]
    assert memory["statistics_values"] > 0
    assert memory["values"] == memory["classifier_parameters"] + memory["statistics_values"]
