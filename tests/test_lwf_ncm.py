"""LwF + NCM and its drift corrections (docs/algorithm.md §13): the loss (local CE + lambda
KD) and the later tasks' schedule and weight decay; SDC's kernel against explicit sums, ADC's
step against a hand-computed gradient step, LDC's Adam fit against least squares; a whole
run's drift stages, interrupted and resumed."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from abd_jax import experiment, losses, methods, train
from abd_jax.methods import lwf_ncm
from abd_jax.methods.teacher import FrozenModel
from configs import digits
from helpers import tiny_config


def test_sdc_drift_equals_its_explicit_sums():
    rs = np.random.RandomState(0)
    old, new, means = rs.rand(7, 3), rs.rand(7, 3), rs.rand(2, 3)
    sigma = 0.4
    expected = np.zeros((2, 3))
    for c in range(2):
        w = np.array([np.exp(-np.sum((old[i] - means[c]) ** 2) / (2 * sigma ** 2)) + 1e-5
                      for i in range(7)])
        expected[c] = sum(w[i] / w.sum() * (new[i] - old[i]) for i in range(7))
    np.testing.assert_allclose(losses.sdc_drift(old, new, means, sigma), expected, rtol=1e-12)
    # Far from every image, the 1e-5 floor leaves the plain mean drift.
    far = losses.sdc_drift(old, new, means + 100.0, sigma)
    np.testing.assert_allclose(far, np.tile((new - old).mean(0), (2, 1)), rtol=1e-9)


def test_adversarial_step_and_feature_mse_by_hand():
    x = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    g = jnp.array([[3.0, 0.0], [0.0, 4.0]])  # |g| = 5 over the whole batch
    np.testing.assert_allclose(losses.adversarial_step(x, g, 5.0, -1.5, 10.0),
                               [[-1.5, 2.0], [0.0, -1.5]])
    np.testing.assert_allclose(losses.feature_mse(jnp.array([[1.0, 3.0]]),
                                                  jnp.array([[0.0, 1.0]])), 2.5)


class LinearFeatures(nn.Module):
    """features = flatten(x) W (no bias), logits = features: a model whose input gradient is
    written by hand."""

    @nn.compact
    def __call__(self, x, train=False):
        f = nn.Dense(2, use_bias=False, name="w")(x.reshape((x.shape[0], -1)))
        return f, f


def test_the_adc_attack_is_gradient_steps_on_the_feature_distance():
    """One step: d/dx mean((x W - mu)^2) = 2 (x W - mu) W^T / (B D), then
    x - alpha g / |g|, clipped."""
    model = LinearFeatures()
    w = np.array([[1.0, -1.0], [0.5, 2.0], [0.0, 1.0], [1.0, 0.0]], np.float32)
    frozen = FrozenModel({"w": {"kernel": w}}, {})
    images = np.array([[[[10], [200]], [[30], [0]]], [[[255], [5]], [[90], [60]]]], np.uint8)
    target = np.array([0.5, -0.25], np.float32)
    attack = jax.jit(lwf_ncm._attack(model, (0.5,), (0.25,), 1, 0.3))
    x_adv, f_adv = attack(frozen, images, target, -1.0, 1.5)
    x = ((images.astype(np.float64) / 255 - 0.5) / 0.25).reshape(2, 4)
    grad = 2 * (x @ w - target) @ w.T / 4
    expected = np.clip(x - 0.3 * grad / np.linalg.norm(grad), -1.0, 1.5)
    np.testing.assert_allclose(np.asarray(x_adv).reshape(2, 4), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f_adv, expected @ w, rtol=1e-5, atol=1e-6)


def test_ldc_fit_reaches_the_least_squares_map():
    rs = np.random.RandomState(0)
    old = rs.randn(64, 4).astype(np.float32)
    true = rs.randn(4, 4).astype(np.float32)
    new = (old @ true.T + 0.01 * rs.randn(64, 4)).astype(np.float32)
    index, weights = lwf_ncm.epoch_batches(np.array([0, 1], np.uint32), 64, 400, 20)
    kernel, fit = jax.jit(lwf_ncm._ldc_fit(0.02))(np.zeros((4, 4), np.float32), old, new,
                                                  index, weights)
    least_squares = np.linalg.lstsq(old, new, rcond=None)[0].T
    np.testing.assert_allclose(kernel, least_squares, atol=2e-3)
    assert fit[-1] < fit[0]
    # The loss of a partial batch averages its valid rows only.
    np.testing.assert_allclose(
        losses.linear_map_loss(true, old[:3], new[:3], np.array([1.0, 1.0, 0.0])),
        np.mean((old[:2] @ true.T - new[:2]) ** 2), rtol=1e-5)


def test_epoch_batches_cover_every_row_once_per_epoch():
    index, weights = lwf_ncm.epoch_batches(np.array([0, 5], np.uint32), 10, 2, 4)
    assert index.shape == weights.shape == (6, 4)  # 3 batches per epoch: 4 + 4 + 2
    for e in range(2):
        rows = index[3 * e:3 * e + 3][weights[3 * e:3 * e + 3] > 0]
        assert sorted(rows.tolist()) == list(range(10))
    assert weights[2].tolist() == [1, 1, 0, 0]
    assert index[:3].tolist() != index[3:].tolist()  # a new order each epoch


def test_the_loss_is_local_ce_plus_lambda_kd_on_the_old_logits(monkeypatch):
    logits = jnp.array([[2.0, -1.0, 0.5, 1.0, 9.0]])  # 2 old, 2 new, 1 future class
    teacher = jnp.array([[1.0, 0.0, 3.0, 3.0, 3.0]])
    label = jnp.array([3])

    def forward(images):
        return logits, None, {}

    model = LinearFeatures()
    ctx = train.LossContext(forward=forward, model=model, params=None, batch_stats={},
                            inputs=None, images=jnp.zeros((1, 2, 2, 1)), labels=label,
                            num_old=jnp.int32(2), num_seen=jnp.int32(4), rng=None)
    ctx = ctx.replace(inputs=lwf_ncm.LwfNcmState(teacher=FrozenModel({}, {}), means=None))
    monkeypatch.setattr(lwf_ncm, "frozen_apply", lambda *a, **k: (teacher, None))
    loss, _, metrics = lwf_ncm.lwf_local_loss(ctx, lam=10.0, temperature=2.0)
    ce = -np.log(np.exp(1.0) / (np.exp(0.5) + np.exp(1.0)))  # over the new classes 2, 3
    p = np.exp([0.5, 0.0]) / np.exp([0.5, 0.0]).sum()
    log_q = np.array([1.0, -0.5]) - np.log(np.exp([1.0, -0.5]).sum())
    kd = -np.sum(p * log_q)  # T = 2, no T^2
    np.testing.assert_allclose([metrics["ce"], metrics["kd"], loss], [ce, kd, ce + 10 * kd],
                               rtol=1e-5)


def test_later_tasks_train_at_their_own_schedule_and_weight_decay(session):
    config = digits.get_config()
    config.method = "lwf_ncm"
    method = methods.get_method(config)
    first, later = methods.Task(0, 5, 0, 2), methods.Task(1, 5, 2, 4)
    ft, o = config.first_task, config.lwf_ncm
    s = method.schedule(config, first)
    assert (s.epochs, s.lr, s.cosine, s.weight_decay) == (ft.epochs, ft.lr, True, None)
    assert method.weight_decay(config) == ft.weight_decay
    s = method.schedule(config, later)
    assert (s.epochs, s.lr, s.milestones, s.weight_decay) == (
        o.epochs, o.lr, tuple(o.milestones), o.weight_decay)
    assert method.loss_fn(first) is methods.base.ce and method.loss_fn(later) is not first
    with pytest.raises(ValueError, match="lwf_ncm.drift='adx'"):
        config.lwf_ncm.drift = "adx"
        methods.get_method(config)


def test_a_stage_weight_decay_replaces_the_optimisers(session):
    """SGD with momentum 0.9 from a zero trace, a zero gradient: p - lr * wd * p."""
    tx = train.learner_optimizer(session, 0.1, 0.9, 5e-4)
    params = {"w": jnp.array([2.0])}
    state = train.TrainState.create(apply_fn=None, params=params, tx=tx, batch_stats={})
    zero = {"w": jnp.zeros(1)}
    own = train.sgd_update(state, zero, {}, 0.1, jnp.float32(-1.0))
    stage = train.sgd_update(state, zero, {}, 0.1, jnp.float32(2e-4))
    np.testing.assert_allclose(own.params["w"], [2.0 - 0.1 * 5e-4 * 2.0], rtol=1e-6)
    np.testing.assert_allclose(stage.params["w"], [2.0 - 0.1 * 2e-4 * 2.0], rtol=1e-6)
    assert isinstance(tx, optax.GradientTransformation)


@pytest.mark.slow
@pytest.mark.parametrize("drift", ["adc", "ldc"])
def test_an_interrupted_drift_stage_resumes_to_the_same_numbers(drift, digits_data_dir,
                                                                tmp_path, monkeypatch, session):
    config = tiny_config(digits_data_dir, method="lwf_ncm", num_tasks=3, num_classes=6,
                         **{"first_task": {**digits.get_config().first_task.to_dict(),
                                           "epochs": 2},
                            "lwf_ncm": {**digits.get_config().lwf_ncm.to_dict(), "epochs": 1,
                                        "milestones": (), "drift": drift,
                                        "ldc_epochs": 2, "adc_samples": 8}})
    straight = experiment.run(config, tmp_path / "straight", session=session)
    real, calls = lwf_ncm.LwFNCM.update_means, {"n": 0}

    def crashing(self, rt, *args):  # in task 2's drift stage, once its work is done
        out = real(self, rt, *args)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(lwf_ncm.LwFNCM, "update_means", crashing)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(config, tmp_path / "resumed", session=session)
    monkeypatch.setattr(lwf_ncm.LwFNCM, "update_means", real)
    resumed = experiment.run(config, tmp_path / "resumed", session=session)
    assert resumed["repeats"][0]["R_global"] == straight["repeats"][0]["R_global"]
    assert straight["repeats"][0]["A_global"][-1] > 100 / 6  # above chance on 6 classes
    logged = (tmp_path / "straight" / "metrics.jsonl").read_text()
    assert ("adc_fallbacks" if drift == "adc" else "ldc_mse") in logged
    if drift == "ldc":  # (once) the drift moves the old means only: task 1 is the same
        none = experiment.run(experiment.config_with(config, {"lwf_ncm.drift": "none"}),
                              tmp_path / "none", session=session)
        assert none["repeats"][0]["R_global"][0] == straight["repeats"][0]["R_global"][0]
        assert none["repeats"][0]["R_global"][1:] != straight["repeats"][0]["R_global"][1:]
