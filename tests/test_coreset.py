"""Coreset baselines (SPEC section 6): the memory, herding, E2E's balanced stage, BiC's bias
correction, memory accounting, and resume through every new end-of-task stage (DGR's too)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abd_jax import experiment, losses, methods, models, train
from abd_jax.methods import bic, coreset, dgr
from configs import digits
from helpers import three_task_config, tiny_config


def test_quotas_are_balanced_and_the_newest_classes_take_the_remainder():
    q = coreset.class_quotas(30, 2000)  # 66 each, 20 left over
    assert q.sum() == 2000 and set(q) == {66, 67}
    np.testing.assert_array_equal(q[-20:], 67)
    np.testing.assert_array_equal(coreset.class_quotas(10, 2000), 200)


def test_herding_picks_the_examples_that_keep_the_running_mean_closest():
    rng = np.random.RandomState(0)
    f = rng.randn(40, 5)
    order = coreset.herding_order(f, 6)
    unit = f / np.linalg.norm(f, axis=1, keepdims=True)
    mean = unit.mean(axis=0)
    assert order[0] == np.argmin(np.linalg.norm(unit - mean, axis=1))
    for k in range(2, 7):  # each pick is the greedy best given the earlier ones
        chosen = unit[order[:k - 1]].sum(axis=0)
        rest = [i for i in range(40) if i not in order[:k - 1]]
        best = rest[int(np.argmin([np.linalg.norm(mean - (chosen + unit[i]) / k)
                                   for i in rest]))]
        assert order[k - 1] == best
    assert len(set(order)) == 6


class FakeRuntime:
    """The services a coreset method uses, on 4 classes x 10 toy examples."""

    def __init__(self, memory_size=8, key=0):
        self.train_labels = np.repeat(np.arange(4), 10).astype(np.int32)
        rng = np.random.RandomState(1)
        self.features = rng.randn(40, 3)
        self.method_key = jax.random.PRNGKey(key)
        self.image_shape = (2, 2, 1)
        self.stages = []

    def task_indices(self, t):
        return np.flatnonzero((self.train_labels >= 2 * t) & (self.train_labels < 2 * t + 2))

    def predict_train(self, learner, index):
        return np.zeros((len(index), 4)), self.features[index]

    def train_stage(self, learner, state, loss_fn, index, **kwargs):
        self.stages.append((np.asarray(index), kwargs))
        return learner

    def log(self, *args, **kwargs):
        pass


def _task(t):
    return methods.Task(index=t, num_tasks=2, num_old=2 * t, num_seen=2 * t + 2)


@pytest.mark.parametrize("selection", ["random", "herding"])
def test_memory_is_class_balanced_deterministic_and_shrinks(selection):
    rt, store = FakeRuntime(), coreset.Coreset(8, selection)
    m1 = np.asarray(store.updated(rt, None, store.empty(), _task(0), rt.method_key))
    assert (m1 >= 0).all() and np.bincount(rt.train_labels[m1]).tolist() == [4, 4]
    again = np.asarray(store.updated(rt, None, store.empty(), _task(0), rt.method_key))
    np.testing.assert_array_equal(m1, again)
    m2 = np.asarray(store.updated(rt, None, jnp.asarray(m1), _task(1), rt.method_key))
    assert np.bincount(rt.train_labels[m2]).tolist() == [2, 2, 2, 2]
    for c in (0, 1):  # old classes keep their first (highest-priority) exemplars
        np.testing.assert_array_equal(m2[rt.train_labels[m2] == c],
                                      m1[rt.train_labels[m1] == c][:2])
    if selection == "herding":
        members = np.flatnonzero(rt.train_labels == 2)
        np.testing.assert_array_equal(m2[rt.train_labels[m2] == 2],
                                      members[coreset.herding_order(rt.features[members], 2)])
    else:
        other = np.asarray(store.updated(rt, None, store.empty(), _task(0),
                                         jax.random.PRNGKey(5)))
        assert not np.array_equal(other, m1)  # another seed, another selection


def test_rehearsal_trains_on_the_task_plus_the_memory():
    config = digits.get_config()
    config.method, config.memory = "naive_rehearsal", 8
    method = methods.get_method(config)
    rt = FakeRuntime()
    state = method.init_state(rt, None)
    np.testing.assert_array_equal(method.train_index(rt, state, _task(0)), rt.task_indices(0))
    _, state = method.end_task(rt, None, state, _task(0))
    index = method.train_index(rt, state, _task(1))
    assert len(index) == 20 + 8 and set(rt.train_labels[index[20:]]) == {0, 1}


def test_e2e_fine_tunes_on_the_balanced_memory_at_lr_over_100():
    config = digits.get_config()
    config.method, config.memory = "e2e", 8
    method = methods.get_method(config)
    rt = FakeRuntime()
    model = models.CifarResNet(depth=8, num_classes=4, width=4)
    learner = train.create_train_state(model, jax.random.PRNGKey(0), (8, 8, 1), 0.1, 0.9, 0.0)
    state = method.init_state(rt, learner)
    _, state = method.end_task(rt, learner, state, _task(0))
    assert rt.stages == []  # nothing to balance after the first task
    _, state = method.end_task(rt, learner, state, _task(1))
    (index, kwargs), = rt.stages
    np.testing.assert_array_equal(index, np.asarray(state.memory))  # the updated memory
    assert np.bincount(rt.train_labels[index]).tolist() == [2, 2, 2, 2]
    assert kwargs["lr"] == pytest.approx(config.lr / 100)
    assert kwargs["epochs"] == config.e2e.balanced_epochs


def test_taskwise_kd_sums_one_kd_per_past_task():
    s = jax.random.normal(jax.random.PRNGKey(0), (4, 9))
    t = jax.random.normal(jax.random.PRNGKey(1), (4, 9))
    want = sum(losses.kd_loss(s[:, j:j + 3], t[:, j:j + 3], 2.0) for j in (0, 3))
    np.testing.assert_allclose(losses.taskwise_kd_loss(s, t, 6, 3, 2.0), want, rtol=1e-5)


def test_bias_correction_touches_only_the_corrected_tasks_logits():
    z = jax.random.normal(jax.random.PRNGKey(0), (3, 8))
    alpha, beta = jnp.array([2.0, 0.5, 3.0, 4.0]), jnp.array([1.0, -1.0, 5.0, 6.0])
    out = losses.bias_correction(z, alpha, beta, 2, 4)  # tasks 0 and 1 corrected
    np.testing.assert_allclose(out[:, :2], 2.0 * z[:, :2] + 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[:, 2:4], 0.5 * z[:, 2:4] - 1.0, rtol=1e-6)
    np.testing.assert_array_equal(out[:, 4:], z[:, 4:])


def test_bic_fits_only_the_new_tasks_two_parameters_and_undoes_a_bias():
    """Held-out logits whose new classes (task 1) are inflated by +3: stage 2 must lower the
    new task's logits and leave task 0's correction untouched."""
    rng = np.random.RandomState(0)
    labels = np.repeat(np.arange(4), 25)
    logits = rng.randn(100, 4) + 4.0 * np.eye(4)[labels]
    logits[:, 2:] += 3.0
    alpha, beta = jnp.array([1.5, 1.0]), jnp.array([0.25, 0.0])
    a, b, loss = bic.fit_bias(jnp.asarray(logits), jnp.asarray(labels), alpha, beta, 1, 4, 2,
                              500, 0.05)
    before = losses.valid_ce_loss(losses.bias_correction(jnp.asarray(logits), alpha, beta, 2, 4),
                                  jnp.asarray(labels), 4)
    assert float(loss) < float(before)
    assert float(b) < -1.0 or float(a) < 0.8  # the new logits come down
    # task 0's correction is an input, not a parameter of the fit:
    z = losses.bias_correction(jnp.asarray(logits), alpha.at[1].set(a), beta.at[1].set(b), 2, 4)
    np.testing.assert_allclose(z[:, :2], 1.5 * logits[:, :2] + 0.25, rtol=1e-5)


def test_bic_holds_out_part_of_the_memory_and_of_the_new_data():
    config = digits.get_config()
    config.method, config.memory, config.num_tasks = "bic", 8, 2
    config.bic.val_fraction = 0.5
    method = methods.get_method(config)
    rt = FakeRuntime()
    model = models.CifarResNet(depth=8, num_classes=4, width=4)
    learner = train.create_train_state(model, jax.random.PRNGKey(0), (8, 8, 1), 0.1, 0.9, 0.0)
    state = method.init_state(rt, learner)
    assert len(method.split(rt, state, _task(0))[1]) == 0
    _, state = method.end_task(rt, learner, state, _task(0))
    train_index, held = method.split(rt, state, _task(1))
    assert not set(train_index) & set(held)
    assert np.bincount(rt.train_labels[held], minlength=4).tolist() == [2, 2, 2, 2]
    assert len(train_index) + len(held) == 20 + 8
    np.testing.assert_array_equal(held, method.split(rt, state, _task(1))[1])


@pytest.mark.parametrize("method", ["naive_rehearsal", "lwf_coreset", "e2e", "bic"])
def test_coreset_methods_run_and_account_for_their_memory(digits_data_dir, reference_run,
                                                          method):
    results, workdir = reference_run(three_task_config(digits_data_dir, method))
    memory = results["repeats"][0]["memory"]
    assert memory["stored_images"] == 60 and memory["stored_image_bytes"] == 60 * 64
    assert memory["bytes"] == 4 * memory["classifier_parameters"] + 60 * 64
    assert memory["values"] == memory["classifier_parameters"] + 60 * 64  # the release's count
    assert "memory kept between tasks" in (workdir / "summary.md").read_text()
    assert results["aggregate"]["memory"] == memory


def test_e2e_balanced_finetuning_steps_at_its_own_learning_rate(digits_data_dir,
                                                                 reference_run):
    """The stage reuses the task's compiled chunk with its learning rate as an argument."""
    config = three_task_config(digits_data_dir, "e2e")
    _, workdir = reference_run(config)
    lines = [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]
    lrs = {phase: sorted({line["lr"] for line in lines if line.get("phase", "train") == phase
                          and "lr" in line}) for phase in ("train", "balanced_finetuning")}
    assert lrs["train"] == [pytest.approx(config.lr)]  # (1 epoch: before the first milestone)
    assert lrs["balanced_finetuning"] == [
        pytest.approx(config.lr * config.e2e.balanced_lr_scale)]


def test_replay_methods_count_their_generator(digits_data_dir, tmp_path):
    results = experiment.run(tiny_config(digits_data_dir, method="abd", epochs=1, num_tasks=2),
                             tmp_path)
    memory = results["repeats"][0]["memory"]
    assert memory["generator_parameters"] > memory["classifier_parameters"] > 0
    assert "stored_images" not in memory


def _interrupt_once(monkeypatch, owner, name, at_call):
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return real


@pytest.mark.parametrize("method,stage", [
    ("naive_rehearsal", "coreset update"), ("e2e", "balanced fine-tuning"),
    ("bic", "bias fit"), ("dgr", "autoencoder training")])
def test_interrupt_in_an_end_of_task_stage_resumes_identically(digits_data_dir, reference_run,
                                                               tmp_path, monkeypatch, method,
                                                               stage):
    config = three_task_config(digits_data_dir, method)
    reference, _ = reference_run(config)
    owner, name = {"coreset update": (coreset.Coreset, "updated"),
                   "balanced fine-tuning": (experiment.RepeatRunner, "_train_stage"),
                   "bias fit": (bic, "fit_bias"),
                   "autoencoder training": (dgr.DGR, "vae_chunk")}[stage]
    real = _interrupt_once(monkeypatch, owner, name, at_call=2)  # at the end of task 3 or 2
    with pytest.raises(KeyboardInterrupt):
        experiment.run(config, tmp_path / "resumed")
    monkeypatch.setattr(owner, name, real)
    resumed = experiment.run(config, tmp_path / "resumed")
    assert [r["R_global"] for r in resumed["repeats"]] == [
        r["R_global"] for r in reference["repeats"]]
