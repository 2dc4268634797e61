"""Coreset baselines as the release runs them (SPEC section 6b): the memory and its
selections, the 1:1 replay of the random-memory methods, E2E's balanced stage, BiC's held-out
split and bias correction, memory accounting, and resume through every end-of-task stage
(DGR's too)."""
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
    # on raw features (the release's BiC) the same greedy rule picks other examples here
    raw = coreset.herding_order(f, 6, normalize=False)
    mean = f.mean(axis=0)
    assert raw[0] == np.argmin(np.linalg.norm(f - mean, axis=1))
    chosen = f[raw[:1]].sum(axis=0)
    rest = [i for i in range(40) if i != raw[0]]
    assert raw[1] == rest[int(np.argmin([np.linalg.norm(mean - (chosen + f[i]) / 2)
                                         for i in rest]))]
    assert not np.array_equal(raw, order)


def test_closest_to_mean_ranks_by_distance_to_the_class_mean():
    """The release's E2E: raw features, nearest to the class mean first."""
    f = np.array([[0.0, 0.0], [10.0, 0.0], [1.0, 1.0], [4.0, 3.0]])  # mean (3.75, 1)
    # distances: 3.88, 6.32, 2.75, 2.02
    np.testing.assert_array_equal(coreset.closest_to_mean_order(f, 3), [3, 2, 0])
    np.testing.assert_array_equal(coreset.ranked(f, 2, "closest_to_mean"), [3, 2])


class FakeRuntime:
    """The services a coreset method uses, on 4 classes x 10 toy examples."""

    def __init__(self, memory_size=8, key=0):
        self.train_labels = np.repeat(np.arange(4), 10).astype(np.int32)
        rng = np.random.RandomState(1)
        self.features = rng.randn(40, 3)
        self.method_key = jax.random.PRNGKey(key)
        self.image_shape = (2, 2, 1)
        self.stages = []
        self.logged = []

    def task_key(self, t):
        return jax.random.fold_in(jax.random.PRNGKey(99), t)

    def task_indices(self, t):
        return np.flatnonzero((self.train_labels >= 2 * t) & (self.train_labels < 2 * t + 2))

    def predict_train(self, learner, index):
        return np.zeros((len(index), 4)), self.features[index]

    def train_stage(self, learner, state, loss_fn, index, **kwargs):
        self.stages.append((np.asarray(index), kwargs, learner, state))
        return learner

    def log(self, *args, **kwargs):
        self.logged.append((args, kwargs))


def _task(t):
    return methods.Task(index=t, num_tasks=2, num_old=2 * t, num_seen=2 * t + 2)


@pytest.mark.parametrize("selection", coreset.SELECTIONS)
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
    if selection != "random":
        members = np.flatnonzero(rt.train_labels == 2)
        np.testing.assert_array_equal(m2[rt.train_labels[m2] == 2], members[coreset.ranked(
            rt.features[members], 2, selection)])
    else:
        other = np.asarray(store.updated(rt, None, store.empty(), _task(0),
                                         jax.random.PRNGKey(5)))
        assert not np.array_equal(other, m1)  # another seed, another selection


@pytest.mark.parametrize("name", ["naive_rehearsal", "lwf_coreset"])
def test_random_memory_methods_draw_as_many_memory_samples_as_the_task_has(name):
    """The release's append_coreset: the task's images plus len(task) memory samples drawn
    with replacement, once per task (a pure function of the state and the task)."""
    config = digits.get_config()
    config.method, config.memory = name, 8
    method = methods.get_method(config)
    rt = FakeRuntime()
    model = models.CifarResNet(depth=8, num_classes=4, width=4)
    learner = train.create_train_state(model, jax.random.PRNGKey(0), (8, 8, 1), 0.1, 0.9, 0.0)
    state = method.init_state(rt, learner)
    np.testing.assert_array_equal(method.train_index(rt, state, _task(0)), rt.task_indices(0))
    _, state = method.end_task(rt, learner, state, _task(0))
    index = method.train_index(rt, state, _task(1))
    np.testing.assert_array_equal(index[:20], rt.task_indices(1))
    replayed = index[20:]
    assert len(replayed) == 20 and set(replayed) <= set(np.asarray(state.memory))
    assert len(set(replayed)) < len(replayed)  # with replacement: 20 draws from 8
    np.testing.assert_array_equal(index, method.train_index(rt, state, _task(1)))
    assert method.index_capacity(rt, 2) == 40


def test_e2e_balanced_stage_follows_the_release():
    """Head only, on the updated (class-balanced) memory, at lr / 100, with the task's epochs
    and schedule; from the model before the stage and the previous task's teacher."""
    config = digits.get_config()
    config.method, config.memory = "e2e", 8
    method = methods.get_method(config)
    rt = FakeRuntime()
    model = models.CifarResNet(depth=8, num_classes=4, width=4)
    learner = train.create_train_state(model, jax.random.PRNGKey(0), (8, 8, 1), 0.1, 0.9, 0.0)
    state = method.init_state(rt, learner)
    _, state = method.end_task(rt, learner, state, _task(0))
    assert rt.stages == []  # nothing to balance after the first task
    previous = state.teacher
    out, state = method.end_task(rt, learner, state, _task(1))
    (index, kwargs, stage, inputs), = rt.stages
    np.testing.assert_array_equal(index, np.asarray(state.memory))  # the updated memory
    assert np.bincount(rt.train_labels[index]).tolist() == [2, 2, 2, 2]
    assert kwargs["lr"] == pytest.approx(config.lr / 100)
    assert kwargs["epochs"] == config.epochs
    assert kwargs["lr_milestones"] == tuple(config.lr_milestones)
    assert stage.tx is not learner.tx and out.tx is learner.tx  # its own optimiser, then back
    assert inputs.teacher is previous
    jax.tree.map(np.testing.assert_array_equal, inputs.before.params, learner.params)
    config.e2e.balanced_epochs = 30  # the E2E paper's: 30 epochs at a constant rate
    rt.stages.clear()
    methods.get_method(config).end_task(rt, learner, state, _task(1))
    assert rt.stages[0][1]["epochs"] == 30 and rt.stages[0][1]["lr_milestones"] == ()


def test_taskwise_kd_sums_one_weighted_kd_per_past_task():
    s = jax.random.normal(jax.random.PRNGKey(0), (4, 9))
    t = jax.random.normal(jax.random.PRNGKey(1), (4, 9))
    want = sum(losses.kd_loss(s[:, j:j + 3], t[:, j:j + 3], 2.0) for j in (0, 3))
    np.testing.assert_allclose(losses.taskwise_kd_loss(s, t, 6, 3, 2.0), want, rtol=1e-5)
    np.testing.assert_allclose(losses.taskwise_kd_loss(s, t, 6, 3, 2.0, 0.5), want / 2,
                               rtol=1e-5)


def test_bias_correction_touches_only_the_corrected_tasks_logits():
    z = jax.random.normal(jax.random.PRNGKey(0), (3, 8))
    alpha, beta = jnp.array([2.0, 0.5, 3.0, 4.0]), jnp.array([1.0, -1.0, 5.0, 6.0])
    out = losses.bias_correction(z, alpha, beta, 2, 4)  # tasks 0 and 1 corrected
    np.testing.assert_allclose(out[:, :2], 2.0 * z[:, :2] + 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[:, 2:4], 0.5 * z[:, 2:4] - 1.0, rtol=1e-6)
    np.testing.assert_array_equal(out[:, 4:], z[:, 4:])


def test_bic_holds_out_the_first_exemplars_and_images_of_each_class():
    """The release's split: int(int(val_fraction * stored) / K_old) per class, the old
    classes' first (highest-priority) exemplars and the new classes' first images."""
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
    # 8 stored exemplars, K_old 2: int(int(0.5 * 8) / 2) = 2 per class
    assert np.bincount(rt.train_labels[held], minlength=4).tolist() == [2, 2, 2, 2]
    memory = coreset.memory_by_class(np.asarray(state.memory), rt.train_labels)
    for c in (0, 1):
        np.testing.assert_array_equal(held[rt.train_labels[held] == c], memory[c][:2])
    for c in (2, 3):
        np.testing.assert_array_equal(held[rt.train_labels[held] == c],
                                      np.flatnonzero(rt.train_labels == c)[:2])
    assert not set(train_index) & set(held)
    assert len(train_index) + len(held) == 20 + 8
    np.testing.assert_array_equal(held, method.split(rt, state, _task(1))[1])


def test_bic_stage2_follows_the_release_and_skips_a_split_under_one_batch():
    config = digits.get_config()
    config.method, config.memory, config.num_tasks, config.batch_size = "bic", 8, 2, 8
    config.bic.val_fraction = 0.5
    method = methods.get_method(config)
    rt = FakeRuntime()
    model = models.CifarResNet(depth=8, num_classes=4, width=4)
    learner = train.create_train_state(model, jax.random.PRNGKey(0), (8, 8, 1), 0.1, 0.9, 0.0)
    state = method.init_state(rt, learner)
    _, state = method.end_task(rt, learner, state, _task(0))
    method.end_task(rt, learner, state, _task(1))
    (index, kwargs, stage, inputs), = rt.stages
    np.testing.assert_array_equal(index, method.split(rt, state, _task(1))[1])
    assert kwargs["lr"] == pytest.approx(config.lr / 100)
    assert kwargs["epochs"] == config.epochs
    assert kwargs["lr_milestones"] == tuple(config.lr_milestones)
    assert set(stage.params) == {"alpha", "beta"} and int(inputs.task_index) == 1
    config.batch_size = 16  # the held-out split (8 images) is under one batch: no stage 2
    rt.stages.clear()
    _, after = methods.get_method(config).end_task(rt, learner, state, _task(1))
    assert rt.stages == [] and float(after.alpha[1]) == 1.0 and float(after.beta[1]) == 0.0


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
    """The stage runs at lr * balanced_lr_scale."""
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
                   "bias fit": (bic.BiC, "fit_correction"),
                   "autoencoder training": (experiment.RepeatRunner, "_train_stage")}[stage]
    real = _interrupt_once(monkeypatch, owner, name, at_call=2)  # at the end of task 3 or 2
    with pytest.raises(KeyboardInterrupt):
        experiment.run(config, tmp_path / "resumed")
    monkeypatch.setattr(owner, name, real)
    resumed = experiment.run(config, tmp_path / "resumed")
    assert [r["R_global"] for r in resumed["repeats"]] == [
        r["R_global"] for r in reference["repeats"]]
