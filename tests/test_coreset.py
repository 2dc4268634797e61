"""Coreset baselines as the release runs them (SPEC section 6b): the memory and its
selections, the 1:1 replay of the random-memory methods, E2E's balanced stage, BiC's held-out
split and bias correction, memory accounting, and resume through every end-of-task stage
(DGR's too)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abd_jax import experiment, losses, methods, models, runner, train
from abd_jax.methods import coreset
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


class FakePlan:
    """A plan of 2 tasks of 2 classes, 4 classes x 10 toy examples."""

    train_labels = np.repeat(np.arange(4), 10).astype(np.int32)
    num_tasks = 2

    def task_indices(self, t):
        return np.flatnonzero((self.train_labels >= 2 * t) & (self.train_labels < 2 * t + 2))

    def task_key(self, t):
        return np.array([99, t], np.uint32)


class FakeServices:
    """Records the stages' loops (runs none) and logs; features are fixed toy vectors."""

    def __init__(self):
        self.features = np.random.RandomState(1).randn(40, 3)
        self.loops, self.logged = [], []

    def predict_train(self, learner, index):
        return np.zeros((len(index), 4)), self.features[index]

    def sgd_loop(self, name, loss_fn, method_state, index, schedule, key, task, start):
        self.loops.append(dict(name=name, inputs=method_state, index=np.asarray(index),
                               schedule=schedule, start=start))
        return None

    def log(self, *args, **kwargs):
        self.logged.append((args, kwargs))


def fake_runtime(session, config=None, key=0):
    config = config or digits.get_config()
    return methods.Runtime(config=config, plan=FakePlan(), model=None, mesh=None,
                           image_shape=(2, 2, 1), steps_per_call=1,
                           method_key=np.array([0, key], np.uint32), session=session,
                           services=FakeServices())


def end_task(method, rt, learner, state, task):
    """The stages after `task`, as the task loop runs them (loops recorded, not driven)."""
    for stage in method.end_task(task):
        if isinstance(stage, methods.Update):
            learner, state = stage.fn(rt, learner, state, task)
            continue
        learner, state = stage.begin(rt, learner, state, task)
        assert stage.program(rt, learner, state, task, 0) is None
        learner, state = stage.end(rt, learner, state, task)
    return learner, state


def _task(t):
    return methods.Task(index=t, num_tasks=2, num_old=2 * t, num_seen=2 * t + 2)


def _learner(session, lr=0.1):
    model = models.CifarResNet(depth=8, num_classes=4, width=4)
    tx = session.shared(train.learner_optimizer, lr, 0.9, 0.0)
    return train.create_train_state(session, model, jax.random.PRNGKey(0), (8, 8, 1), tx)


def _method(**overrides):
    config = digits.get_config()
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config, methods.get_method(config)


@pytest.mark.parametrize("selection", coreset.SELECTIONS)
def test_memory_is_class_balanced_deterministic_and_shrinks(selection, session):
    rt, store = fake_runtime(session), coreset.Coreset(8, selection)
    labels, features = rt.plan.train_labels, rt.services.features
    m1 = np.asarray(store.updated(rt, None, store.empty(), _task(0), rt.method_key))
    assert (m1 >= 0).all() and np.bincount(labels[m1]).tolist() == [4, 4]
    again = np.asarray(store.updated(rt, None, store.empty(), _task(0), rt.method_key))
    np.testing.assert_array_equal(m1, again)
    m2 = np.asarray(store.updated(rt, None, m1, _task(1), rt.method_key))
    assert np.bincount(labels[m2]).tolist() == [2, 2, 2, 2]
    for c in (0, 1):  # old classes keep their first (highest-priority) exemplars
        np.testing.assert_array_equal(m2[labels[m2] == c], m1[labels[m1] == c][:2])
    if selection != "random":
        members = np.flatnonzero(labels == 2)
        np.testing.assert_array_equal(m2[labels[m2] == 2], members[coreset.ranked(
            features[members], 2, selection)])
    else:
        other = np.asarray(store.updated(rt, None, store.empty(), _task(0),
                                         np.array([0, 5], np.uint32)))
        assert not np.array_equal(other, m1)  # another seed, another selection


@pytest.mark.parametrize("name", ["naive_rehearsal", "lwf_coreset"])
def test_random_memory_methods_draw_as_many_memory_samples_as_the_task_has(name, session):
    """The release's append_coreset: the task's images plus len(task) memory samples drawn
    with replacement, once per task (a pure function of the state and the task)."""
    config, method = _method(method=name, **{"coreset.memory": 8})
    rt = fake_runtime(session, config)
    learner = _learner(session)
    state = method.init_state(rt, learner)
    np.testing.assert_array_equal(method.train_index(rt, state, _task(0)),
                                  rt.plan.task_indices(0))
    _, state = end_task(method, rt, learner, state, _task(0))
    index = method.train_index(rt, state, _task(1))
    np.testing.assert_array_equal(index[:20], rt.plan.task_indices(1))
    replayed = index[20:]
    assert len(replayed) == 20 and set(replayed) <= set(np.asarray(state.memory))
    assert len(set(replayed)) < len(replayed)  # with replacement: 20 draws from 8
    np.testing.assert_array_equal(index, method.train_index(rt, state, _task(1)))
    assert method.index_capacity(rt) == 40


def test_e2e_balanced_stage_follows_the_release(session):
    """Head only, on the updated (class-balanced) memory, at lr / 100, with the task's epochs
    and schedule; from the model before the stage and the previous task's teacher."""
    config, method = _method(method="e2e", **{"coreset.memory": 8})
    rt = fake_runtime(session, config)
    learner = _learner(session)
    state = method.init_state(rt, learner)
    _, state = end_task(method, rt, learner, state, _task(0))
    assert rt.services.loops == []  # nothing to balance after the first task
    previous = state.teacher
    out, state = end_task(method, rt, learner, state, _task(1))
    loop, = rt.services.loops
    np.testing.assert_array_equal(loop["index"], np.asarray(state.memory))  # the new memory
    assert np.bincount(rt.plan.train_labels[loop["index"]]).tolist() == [2, 2, 2, 2]
    assert loop["schedule"].lr == pytest.approx(config.lr / 100)
    assert loop["schedule"].epochs == config.epochs
    assert loop["schedule"].milestones == tuple(config.lr_milestones)
    assert loop["inputs"].teacher is previous
    jax.tree.map(np.testing.assert_array_equal, loop["inputs"].before.params, learner.params)
    jax.tree.map(np.testing.assert_array_equal, state.head.params, learner.params["head"])
    config.e2e.balanced_epochs = 30  # the E2E paper's: 30 epochs at a constant rate
    rt.services.loops.clear()
    end_task(methods.get_method(config), rt, learner, state, _task(1))
    assert rt.services.loops[0]["schedule"].epochs == 30
    assert rt.services.loops[0]["schedule"].milestones == ()


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


def test_bic_holds_out_the_first_exemplars_and_images_of_each_class(session):
    """The release's split: int(int(val_fraction * stored) / K_old) per class, the old
    classes' first (highest-priority) exemplars and the new classes' first images."""
    config, method = _method(method="bic", num_tasks=2, **{"coreset.memory": 8,
                                                           "bic.val_fraction": 0.5})
    rt = fake_runtime(session, config)
    labels = rt.plan.train_labels
    learner = _learner(session)
    state = method.init_state(rt, learner)
    assert len(method.split(rt, state, _task(0))[1]) == 0
    _, state = end_task(method, rt, learner, state, _task(0))
    train_index, held = method.split(rt, state, _task(1))
    # 8 stored exemplars, K_old 2: int(int(0.5 * 8) / 2) = 2 per class
    assert np.bincount(labels[held], minlength=4).tolist() == [2, 2, 2, 2]
    memory = coreset.memory_by_class(np.asarray(state.memory), labels)
    for c in (0, 1):
        np.testing.assert_array_equal(held[labels[held] == c], memory[c][:2])
    for c in (2, 3):
        np.testing.assert_array_equal(held[labels[held] == c],
                                      np.flatnonzero(labels == c)[:2])
    assert not set(train_index) & set(held)
    assert len(train_index) + len(held) == 20 + 8
    np.testing.assert_array_equal(held, method.split(rt, state, _task(1))[1])


def test_bic_stage2_follows_the_release_and_skips_a_split_under_one_batch(session):
    config, method = _method(method="bic", num_tasks=2, batch_size=8,
                             **{"coreset.memory": 8, "bic.val_fraction": 0.5})
    rt = fake_runtime(session, config)
    learner = _learner(session)
    state = method.init_state(rt, learner)
    _, state = end_task(method, rt, learner, state, _task(0))
    _, after = end_task(method, rt, learner, state, _task(1))
    loop, = rt.services.loops
    np.testing.assert_array_equal(loop["index"], method.split(rt, state, _task(1))[1])
    assert loop["schedule"].lr == pytest.approx(config.lr / 100)
    assert loop["schedule"].epochs == config.epochs
    assert loop["schedule"].milestones == tuple(config.lr_milestones)
    assert int(loop["inputs"].task_index) == 1
    assert set(after.correction.params) == {"alpha", "beta"}
    config.batch_size = 16  # the held-out split (8 images) is under one batch: no stage 2
    rt.services.loops.clear()
    _, after = end_task(methods.get_method(config), rt, learner, state, _task(1))
    assert rt.services.loops == [] and float(after.alpha[1]) == 1.0
    assert float(after.beta[1]) == 0.0


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


def test_replay_methods_count_their_generator(digits_data_dir, tmp_path, session):
    results = experiment.run(tiny_config(digits_data_dir, method="abd", epochs=1, num_tasks=2),
                             tmp_path, session=session)
    memory = results["repeats"][0]["memory"]
    assert memory["generator_parameters"] > memory["classifier_parameters"] > 0
    assert "stored_images" not in memory


def test_interrupt_in_a_host_stage_reruns_it_identically(digits_data_dir, reference_run,
                                                         tmp_path, monkeypatch, session):
    """A crash inside Naive Rehearsal's memory update after task 2 (an `Update` stage): the
    rerun does that stage again from the checkpoint taken when training ended."""
    config = three_task_config(digits_data_dir, "naive_rehearsal")
    reference, _ = reference_run(config)
    real, calls = coreset.Coreset.updated, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(coreset.Coreset, "updated", crashing)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(config, tmp_path, session=session)
    monkeypatch.setattr(coreset.Coreset, "updated", real)
    resumed = experiment.run(config, tmp_path, session=session)
    assert [r["R_global"] for r in resumed["repeats"]] == [
        r["R_global"] for r in reference["repeats"]]


@pytest.mark.parametrize("method,phase,stage,overrides", [
    ("e2e", "balanced_finetuning", 1, {"e2e.balanced_epochs": 3}),
    ("bic", "bias_correction", 0, {"bic.val_fraction": 0.6}),
    ("dgr", "autoencoder", 0, {}),
    ("rdfcil", "head_finetuning", 1, {"rdfcil.finetune_epochs": 1})])
def test_a_crash_inside_an_end_of_task_loop_resumes_from_its_checkpoint(
        digits_data_dir, reference_run, tmp_path, monkeypatch, session, method, phase, stage,
        overrides):
    """E2E's balanced stage, BiC's stage 2, DGR's autoencoder and R-DFCIL's head fine-tuning
    run through the shared driver:
    checkpointed inside (here every step), a crash at their second step after task 2 resumes
    from step 1 of that stage, to the uninterrupted numbers."""
    config = experiment.config_with(three_task_config(digits_data_dir, method), overrides)
    reference, _ = reference_run(config)
    config = experiment.config_with(config, {"checkpoint_every_steps": 1,
                                             "log_every_steps": 1})
    real = runner.RepeatRunner.log

    def crashing(self, step, scalars, **tags):
        if tags.get("phase") == phase and tags.get("task") == 2 and step == 2:
            raise KeyboardInterrupt
        return real(self, step, scalars, **tags)

    monkeypatch.setattr(runner.RepeatRunner, "log", crashing)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(config, tmp_path, session=session)
    monkeypatch.setattr(runner.RepeatRunner, "log", real)
    from abd_jax import checkpoint as ckpt_lib
    checkpointer = ckpt_lib.RunCheckpointer(tmp_path / "checkpoints" / "repeat_0")
    assert checkpointer.latest() == (1, ckpt_lib.stage_step(stage, 1))
    checkpointer.close()
    resumed = experiment.run(config, tmp_path, session=session)
    assert [r["R_global"] for r in resumed["repeats"]] == [
        r["R_global"] for r in reference["repeats"]]
