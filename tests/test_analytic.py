"""ACIL and DS-AL (docs/algorithm.md §12): the expansion, the recursive ridge regression
against hand values and against its closed form, DS-AL's cleansed residual, the float64 state
kept exactly, and the methods' analytic phase as the task loop calls it (host and device
alike; an interrupted run resumes to the same numbers)."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abd_jax import experiment, losses, methods, rng
from abd_jax.methods import analytic
from configs import digits
from helpers import tiny_config

D, C, E = 3, 4, 8


def test_expansion_and_cleansing_by_hand():
    f = np.array([[1.0, -2.0]])
    a = np.array([[1.0, 0.5, 0.0], [1.0, 0.0, -1.0]])  # F A = [-1, 0.5, 2]
    np.testing.assert_allclose(losses.expand(f, a, "relu"), [[0.0, 0.5, 2.0]])
    np.testing.assert_allclose(losses.expand(f, a, "tanh"), np.tanh([[-1.0, 0.5, 2.0]]))
    np.testing.assert_allclose(losses.expand(f, a, "identity"), [[-1.0, 0.5, 2.0]])
    with pytest.raises(ValueError, match="activation 'gelu'"):
        losses.expand(f, a, "gelu")
    y = np.array([[0.0, 1.0, 0.0, 0.0]])
    scores = np.array([[0.25, 0.5, 0.125, 1.0]])
    np.testing.assert_allclose(losses.cleansed_residual(y, scores, 2), [[0, 0, -0.125, -1.0]])
    np.testing.assert_allclose(losses.cleansed_residual(y, scores, 0), y - scores)


def test_recursive_ridge_by_hand():
    """E = 1, gamma 0.5, one example x = 2, y = 1: R_0 = 2, K = 1 / (1 + 2 * 4) = 1/9,
    R = 2 - 2 * 2 * (1/9) * 2 * 2 = 2/9, W = (2/9) * 2 * 1 = 4/9 = (4 + 0.5)^-1 * 2."""
    r, w = losses.recursive_ridge(np.array([[2.0]]), np.array([[0.0]]), np.array([[2.0]]),
                                  np.array([[1.0]]))
    np.testing.assert_allclose(r, [[2 / 9]])
    np.testing.assert_allclose(w, [[4 / 9]])
    np.testing.assert_allclose(losses.ridge(np.array([[2.0]]), np.array([[1.0]]), 0.5),
                               [[4 / 9]])


@pytest.mark.parametrize("backend", ["numpy", "jax_x64"])
def test_recursive_batches_equal_the_closed_form_over_all_data(backend):
    """Whatever the batches, ACIL's recursion gives (sum X^T X + gamma I)^-1 sum X^T Y; and
    the targets may gain columns between batches (a new task's classes)."""
    rng = np.random.RandomState(0)
    x = np.maximum(rng.randn(30, 6), 0.0)
    labels = np.repeat([0, 1, 2], 10)
    y = np.eye(3)[labels]
    gamma = 0.1
    r, w = np.eye(6) / gamma, np.zeros((6, 3))
    with jax.enable_x64(backend == "jax_x64"):
        xp = jnp if backend == "jax_x64" else np
        r, w = xp.asarray(r), xp.asarray(w)
        for lo, hi in ((0, 7), (7, 20), (20, 30)):  # classes 0-1, then 1-2: growing targets
            r, w = losses.recursive_ridge(r, w, xp.asarray(x[lo:hi]), xp.asarray(y[lo:hi]))
        assert np.asarray(w).dtype == np.float64
        np.testing.assert_allclose(np.asarray(w), losses.ridge(x, y, gamma), rtol=1e-9,
                                   atol=1e-12)
        np.testing.assert_allclose(np.asarray(r), np.linalg.inv(x.T @ x + gamma * np.eye(6)),
                                   rtol=1e-9, atol=1e-12)


def test_float64_state_is_kept_bit_for_bit():
    x = np.array([[np.pi, -1e-300], [1e300, np.nextafter(1.0, 2.0)]])
    bits = analytic.as_bits(x)
    assert bits.dtype == np.uint32 and bits.shape == (2, 4)
    placed = jax.device_put(bits)  # as the run places a state (float32 world)
    assert np.array_equal(analytic.from_bits(placed), x)


def test_the_projection_is_pytorchs_default_linear_initialisation():
    a = analytic.random_projection(np.array([0, 7], np.uint32), 16, 500)
    assert a.shape == (16, 500) and a.dtype == np.float64
    assert np.abs(a).max() <= 0.25 and np.abs(a).max() > 0.24  # U(-1/sqrt(16), 1/sqrt(16))
    assert np.array_equal(a, analytic.random_projection(np.array([0, 7], np.uint32), 16, 500))


class FakePlan:
    """2 tasks of 2 classes, 4 classes x 10 toy examples."""

    train_labels = np.repeat(np.arange(C), 10).astype(np.int32)

    def task_indices(self, t):
        return np.flatnonzero((self.train_labels >= 2 * t) & (self.train_labels < 2 * t + 2))


class FakeServices:
    features = np.random.RandomState(1).rand(40, D).astype(np.float32)

    def predict_train(self, learner, index):
        return np.zeros((len(index), C)), self.features[index]


def _setup(name, session, **analytic_overrides):
    config = digits.get_config()
    config.method, config.num_tasks, config.num_classes = name, 2, C
    config.analytic.expansion = E
    for key, value in analytic_overrides.items():
        config.analytic[key] = value
    method = methods.get_method(config)
    rt = types.SimpleNamespace(config=config, plan=FakePlan(), services=FakeServices(),
                               session=session, method_key=np.array([0, 3], np.uint32))
    learner = types.SimpleNamespace(params={"head": {"kernel": np.zeros((D, C), np.float32)}})
    return method, rt, learner


def _task(t):
    return methods.Task(index=t, num_tasks=2, num_old=2 * t, num_seen=2 * t + 2)


def _run_tasks(method, rt, learner, tasks=(0, 1)):
    state = method.init_state(rt, learner)
    for t in tasks:
        stage, = method.end_task(_task(t))
        assert isinstance(stage, methods.Update)
        state = stage.fn(rt, learner, state, _task(t))[1]
    return state


@pytest.mark.parametrize("batch_size", [3, 4096])
def test_acil_equals_the_ridge_regression_on_every_image_seen(batch_size, session):
    method, rt, learner = _setup("acil", session, batch_size=batch_size)
    state = _run_tasks(method, rt, learner)
    a = analytic.from_bits(state.projection)
    x = losses.expand(FakeServices.features.astype(np.float64), a, "relu")
    y = np.eye(C)[FakePlan.train_labels]
    w = losses.ridge(x, y, 0.1)
    np.testing.assert_allclose(analytic.from_bits(state.w), w, rtol=1e-8, atol=1e-10)
    test = np.random.RandomState(2).rand(5, D).astype(np.float32)
    logits = method.eval_logits(rt, state, None, test, _task(1))
    np.testing.assert_allclose(logits, losses.expand(test.astype(np.float64), a, "relu") @ w,
                               rtol=1e-5)
    after_first = _run_tasks(method, rt, learner, (0,))
    first = method.eval_logits(rt, after_first, None, test, _task(0))
    assert (first[:, 2:] == losses.NEG_INF).all()  # the first task is scored analytically too
    kept = sum(int(np.prod(x.shape)) for x in method.kept_statistics(state))
    assert kept == 2 * (D * E + E * E + E * C)  # float64 values, two uint32 each


def test_dsal_fits_the_cleansed_residual_in_a_second_stream(session):
    """One batch per task: after task t the main stream is the ridge of every image seen; the
    compensation stream fits tanh(F A) to Y - relu(F A) W_t with the old classes' columns
    cleared, and the scores add C times its output."""
    method, rt, learner = _setup("dsal", session, batch_size=4096, compensation=0.5)
    state = _run_tasks(method, rt, learner)
    a = analytic.from_bits(state.projection)
    f = FakeServices.features.astype(np.float64)
    main, comp = losses.expand(f, a, "relu"), losses.expand(f, a, "tanh")
    y = np.eye(C)[FakePlan.train_labels]
    first, second = slice(0, 20), slice(20, 40)
    w1, w2 = losses.ridge(main[first], y[first], 0.1), losses.ridge(main, y, 0.1)
    residual = np.concatenate([y[first] - main[first] @ w1,
                               losses.cleansed_residual(y[second], main[second] @ w2, 2)])
    assert (residual[20:, :2] == 0).all() and (residual[:20, 2:] == 0).all()
    w_comp = losses.ridge(comp, residual, 0.1)
    np.testing.assert_allclose(analytic.from_bits(state.w), w2, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(analytic.from_bits(state.w_comp), w_comp, rtol=1e-7,
                               atol=1e-10)
    logits = method.eval_logits(rt, state, None, FakeServices.features, _task(1))
    np.testing.assert_allclose(logits, main @ w2 + 0.5 * comp @ w_comp, rtol=1e-5, atol=1e-6)


def test_dsal_cleanses_by_the_targets_width_so_far(session, monkeypatch):
    """The code clears all but the newest (task's class count) columns of the targets' width,
    the largest label seen so far + 1: a batch before the task's largest label clears fewer
    old columns."""
    method, rt, learner = _setup("dsal", session, batch_size=1)
    state = _run_tasks(method, rt, learner, (0,))
    seen, real = [], losses.cleansed_residual
    monkeypatch.setattr(losses, "cleansed_residual",
                        lambda y, s, cleansed: seen.append(cleansed) or real(y, s, cleansed))
    method.end_task(_task(1))[0].fn(rt, learner, state, _task(1))
    width, expected = 2, []
    order = rng.permutation(rng.fold_in(rt.method_key, 95_002), 20)  # the task's batches
    for label in FakePlan.train_labels[20:][order]:
        width = max(width, int(label) + 1)
        expected.append(width - 2)
    assert seen == expected and seen[-1] == 2


def test_device_and_host_give_the_same_head(session):
    host = _setup("dsal", session, batch_size=7)
    device = _setup("dsal", session, batch_size=7, compute="device")
    a, b = _run_tasks(*host), _run_tasks(*device)
    for name in ("w", "w_comp", "r"):
        np.testing.assert_allclose(analytic.from_bits(getattr(b, name)),
                                   analytic.from_bits(getattr(a, name)), rtol=1e-9,
                                   atol=1e-12)
    test = FakeServices.features[:6]
    np.testing.assert_allclose(device[0].eval_logits(device[1], b, None, test, _task(1)),
                               host[0].eval_logits(host[1], a, None, test, _task(1)),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="analytic.compute='gpu'"):
        _setup("acil", session, compute="gpu")


@pytest.mark.slow
def test_an_interrupted_analytic_phase_resumes_to_the_same_numbers(digits_data_dir, tmp_path,
                                                                    monkeypatch, session):
    config = tiny_config(digits_data_dir, method="dsal", num_tasks=3, num_classes=6,
                         **{"first_task": {**digits.get_config().first_task.to_dict(),
                                           "epochs": 2},
                            "analytic": {**digits.get_config().analytic.to_dict(),
                                         "expansion": 64, "batch_size": 5}})
    straight = experiment.run(config, tmp_path / "straight", session=session)
    real, calls = analytic.fit_batch, {"n": 0}

    def crashing(*args, **kwargs):  # in the middle of task 2's analytic phase (batches of 5)
        calls["n"] += 1
        if calls["n"] == 18:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(analytic, "fit_batch", crashing)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(config, tmp_path / "resumed", session=session)
    monkeypatch.setattr(analytic, "fit_batch", real)
    resumed = experiment.run(config, tmp_path / "resumed", session=session)
    assert resumed["repeats"][0]["R_global"] == straight["repeats"][0]["R_global"]
    assert straight["repeats"][0]["A_global"][-1] > 100 / 6  # above chance on 6 classes
    assert calls["n"] == 18  # (the crash fell inside the phase)
    assert straight["repeats"][0]["memory"]["statistics_values"] >= 2 * 2 * 64 * 64  # 2 R's
