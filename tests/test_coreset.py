"""Coreset baselines as the release runs them (docs/algorithm.md §6b): the memory and its
selections, the 1:1 replay of the random-memory methods, E2E's balanced stage, BiC's held-out
split and bias correction, memory accounting, and resume through every end-of-task stage
(DGR's too)."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abd_jax import augment, experiment, losses, methods, models, services, train
from abd_jax import rng as rng_lib
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

    def sgd_loop(self, name, loss_fn, inputs, index, schedule, key, task, start):
        self.loops.append(dict(name=name, inputs=inputs, index=np.asarray(index),
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
    tx = train.learner_optimizer(session, lr, 0.9, 0.0)
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


def test_release_redraw_keeps_duplicates_and_counts_by_hand():
    """The release's `update_coreset` on a pool with repeats: 18 slots over 4 classes are
    4 each, the 2 left over go to the newest classes with more than 4 candidates."""
    labels = np.repeat(np.arange(4), 10).astype(np.int32)  # images 0-9 class 0, 10-19 class 1
    pool = np.array([5, 5, 5, 7, 11, 11, *range(20, 30), *range(30, 40)])
    memory = coreset.release_redraw(pool, labels, num_seen=4, size=18,
                                    key=np.array([0, 3], np.uint32))
    stored = memory[memory >= 0]
    # class 3 and class 2 take 5 (the remainder), class 1 its 2 candidates, class 0 all 4
    assert np.bincount(labels[stored]).tolist() == [4, 2, 5, 5]
    assert sorted(stored[labels[stored] == 0]) == [5, 5, 5, 7]
    assert sorted(stored[labels[stored] == 1]) == [11, 11]
    assert len(memory) == 18 and (memory[16:] == -1).all()
    # distinct images: 2 (class 0) + 1 (class 1) + 5 + 5
    assert coreset.distinct_count(memory) == 13
    np.testing.assert_array_equal(  # seeded: the same draw again
        memory, coreset.release_redraw(pool, labels, 4, 18, np.array([0, 3], np.uint32)))


@pytest.mark.parametrize("distinct", [False, True])
def test_random_memory_is_redrawn_from_the_resampled_task_as_the_release(distinct, session):
    """By default an old class's new memory is drawn without replacement from its copies in
    the task's 1:1 resample (duplicates kept); `coreset.distinct_memory` keeps its first
    exemplars. Each task's distinct count is recorded for the results."""
    config, method = _method(method="naive_rehearsal", num_tasks=2,
                             **{"coreset.memory": 8, "coreset.distinct_memory": distinct})
    rt = fake_runtime(session, config)
    labels, learner = rt.plan.train_labels, _learner(session)
    state = method.init_state(rt, learner)
    _, state = end_task(method, rt, learner, state, _task(0))
    first = np.asarray(state.memory)
    assert np.asarray(state.distinct).tolist() == [8, 0]
    pool = method.train_index(rt, state, _task(1))
    _, state = end_task(method, rt, learner, state, _task(1))
    memory = np.asarray(state.memory)
    assert np.bincount(labels[memory]).tolist() == [2, 2, 2, 2]
    assert int(state.distinct[1]) == len(set(memory.tolist()))
    if distinct:
        for c in (0, 1):
            np.testing.assert_array_equal(memory[labels[memory] == c],
                                          first[labels[first] == c][:2])
        return
    for c in (0, 1):  # drawn from the resampled copies, never more often than they occur
        chosen, copies = memory[labels[memory] == c], pool[labels[pool] == c]
        for i in set(chosen.tolist()):
            assert (chosen == i).sum() <= (copies == i).sum()
    np.testing.assert_array_equal(memory, coreset.release_redraw(
        pool, labels, 4, 8, rng_lib.fold_in(rt.method_key, 1)))


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


def _run_stage(stage, learner, state, rt, data, steps: int, batch_size: int):
    """A balancing stage as the task loop runs it (begin, `steps` real SGD steps on its
    batches, end); returns (learner, state, the batches' example indices)."""
    from jax.sharding import Mesh

    from abd_jax import sampling
    learner, state = stage.begin(rt, learner, state, _task(1))
    index = stage.index(rt, state, _task(1))
    padded = np.zeros(64, np.int32)
    padded[:len(index)] = index
    info = sampling.TaskInfo(
        index=padded, count=np.int32(len(index)), num_old=np.int32(2), num_seen=np.int32(4),
        steps_per_epoch=np.int32(len(index) // batch_size), total_steps=np.int32(steps),
        key=np.array([7, 1], np.uint32), base_lr=np.float32(0.001),
        lr_milestones=sampling.lr_milestones((), 3), cosine_epochs=np.int32(0))
    cfg = train.StepConfig(batch_size, 0.1, augment.AugmentConfig(0.0, 0.0, False, 0),
                           (0.0,), (1.0,))
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    step = jax.jit(train.make_train_step(rt.model, stage.loss_fn, cfg, mesh))
    trained, inputs = stage.get(learner, state), stage.inputs(learner, state)
    for _ in range(steps):
        trained, _ = step(trained, inputs, data, info)
    learner, state = stage.put(learner, state, trained)
    batches = [np.asarray(sampling.batch_indices(info, k, batch_size)) for k in range(steps)]
    return (*stage.end(rt, learner, state, _task(1)), batches)


@pytest.mark.parametrize("method,setting", [("e2e", "e2e.balanced_bn"),
                                            ("bic", "bic.stage2_bn")])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_balancing_stages_move_the_backbone_statistics_as_the_release(method, setting, mode,
                                                                      session):
    """E2E's head-only stage and BiC's stage 2 train a head or two scalars, but the release
    calls `model.train()` on every batch: BatchNorm normalises with the batch's statistics
    and the frozen backbone's running statistics move. After the stage the learner's running
    mean and variance equal those computed by hand from its batches (momentum 0.1, biased
    variance); in eval mode they stay."""
    from abd_jax import sampling
    from helpers import TinyNet
    batch = 4
    config, method_ = _method(method=method, num_tasks=2, num_classes=4, batch_size=batch,
                              **{"coreset.memory": 8, "bic.val_fraction": 1.0, setting: mode})
    model = TinyNet(num_classes=4)
    tx = train.learner_optimizer(session, 0.1, 0.9, 0.0)
    learner = train.create_train_state(session, model, jax.random.PRNGKey(0), (2, 2, 1), tx)
    rt = dataclasses.replace(fake_runtime(session, config), model=model)
    images = np.random.RandomState(3).randint(0, 256, (40, 2, 2, 1)).astype(np.uint8)
    data = sampling.DeviceData(jnp.asarray(images), jnp.asarray(rt.plan.train_labels))
    state = method_.init_state(rt, learner)
    learner, state = end_task(method_, rt, learner, state, _task(0))
    stages = method_.end_task(_task(1))
    for stage in stages:
        if isinstance(stage, methods.Update):
            learner, state = stage.fn(rt, learner, state, _task(1))
            continue
        before = jax.tree.map(np.asarray, learner.batch_stats["bn"])
        learner, state, batches = _run_stage(stage, learner, state, rt, data, 3, batch)
        break
    after = jax.tree.map(np.asarray, learner.batch_stats["bn"])
    if mode == "eval":
        jax.tree.map(np.testing.assert_array_equal, after, before)
        return
    body = jax.tree.map(np.asarray, learner.params["body"])
    mean, var = before["mean"].astype(np.float64), before["var"].astype(np.float64)
    for chosen in batches:
        h = images[chosen].reshape(batch, -1) / 255.0 @ body["kernel"] + body["bias"]
        mean = 0.9 * mean + 0.1 * h.mean(axis=0)
        var = 0.9 * var + 0.1 * h.var(axis=0)
    np.testing.assert_allclose(after["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after["var"], var, rtol=1e-5, atol=1e-6)
    assert not np.allclose(after["mean"], before["mean"])


def test_taskwise_kd_sums_one_weighted_kd_per_past_task():
    s = jax.random.normal(jax.random.PRNGKey(0), (4, 9))
    t = jax.random.normal(jax.random.PRNGKey(1), (4, 9))
    bounds = ((0, 3), (3, 6), (6, 9))
    want = sum(losses.kd_loss(s[:, j:j + 3], t[:, j:j + 3], 2.0) for j in (0, 3))
    np.testing.assert_allclose(losses.taskwise_kd_loss(s, t, 6, bounds, 2.0), want, rtol=1e-5)
    weights = losses.e2e_task_weights("mean", bounds, 6)  # |task| / K_old, the release's
    np.testing.assert_allclose(weights, [0.5, 0.5, 0.5])
    np.testing.assert_allclose(losses.taskwise_kd_loss(s, t, 6, bounds, 2.0, weights),
                               want / 2, rtol=1e-5)
    # warm start: a first task of 5 classes, then steps of 2; each task weighs its share
    warm = ((0, 5), (5, 7), (7, 9))
    kd = [losses.kd_loss(s[:, lo:hi], t[:, lo:hi], 2.0) for lo, hi in warm[:2]]
    np.testing.assert_allclose(losses.e2e_task_weights("mean", warm, 7), [5 / 7, 2 / 7, 2 / 7])
    np.testing.assert_allclose(
        losses.taskwise_kd_loss(s, t, 7, warm, 2.0, losses.e2e_task_weights("mean", warm, 7)),
        5 / 7 * kd[0] + 2 / 7 * kd[1], rtol=1e-5)
    np.testing.assert_allclose(losses.e2e_task_weights("sum", warm, 7), [1, 1, 1])


def test_bias_correction_touches_only_the_corrected_tasks_logits():
    z = jax.random.normal(jax.random.PRNGKey(0), (3, 8))
    alpha, beta = jnp.array([2.0, 0.5, 3.0, 4.0]), jnp.array([1.0, -1.0, 5.0, 6.0])
    bounds = ((0, 2), (2, 4), (4, 6), (6, 8))
    out = losses.bias_correction(z, alpha, beta, bounds, 4)  # tasks 0 and 1 corrected
    np.testing.assert_allclose(out[:, :2], 2.0 * z[:, :2] + 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[:, 2:4], 0.5 * z[:, 2:4] - 1.0, rtol=1e-6)
    np.testing.assert_array_equal(out[:, 4:], z[:, 4:])
    # warm start: task 0 owns columns 0-4, task 1 columns 5-6, task 2 column 7
    warm = losses.bias_correction(z, alpha, beta, ((0, 5), (5, 7), (7, 8)), 8)
    np.testing.assert_allclose(warm[:, :5], 2.0 * z[:, :5] + 1.0, rtol=1e-6)
    np.testing.assert_allclose(warm[:, 5:7], 0.5 * z[:, 5:7] - 1.0, rtol=1e-6)
    np.testing.assert_allclose(warm[:, 7:], 3.0 * z[:, 7:] + 5.0, rtol=1e-6)


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


@pytest.mark.slow
@pytest.mark.parametrize("method", ["naive_rehearsal", "lwf_coreset", "e2e", "bic"])
def test_coreset_methods_run_and_account_for_their_memory(digits_data_dir, reference_run,
                                                          method):
    results, workdir = reference_run(three_task_config(digits_data_dir, method))
    memory = dict(results["repeats"][0]["memory"])
    distinct = memory.pop("distinct_stored_images")
    assert memory["stored_images"] == 60 and memory["stored_image_bytes"] == 60 * 64
    assert memory["bytes"] == 4 * memory["classifier_parameters"] + 60 * 64
    assert memory["values"] == memory["classifier_parameters"] + 60 * 64  # the release's count
    summary = (workdir / "summary.md").read_text()
    assert "memory kept between tasks" in summary
    assert "distinct images in the memory after each task: 60, " in summary
    assert results["aggregate"]["memory"] == memory
    assert results["aggregate"]["distinct_stored_images"]["mean"] == distinct
    assert len(distinct) == 3 and distinct[0] == 60  # task 1: drawn from its own images
    if method in ("e2e", "bic"):  # exemplars chosen once per class: always distinct
        assert distinct == [60, 60, 60]
    else:  # old classes redrawn from their resampled copies lose distinct images
        assert distinct[2] < 60


@pytest.mark.slow
def test_bic_trains_its_first_task_as_naive_rehearsal(digits_data_dir, reference_run):
    """The release trains BiC's first task as Naive Rehearsal's (no memory yet, nothing held
    out): at the same seed, the same batches and losses, the same accuracy after task 1."""
    runs = {m: reference_run(three_task_config(digits_data_dir, m))
            for m in ("bic", "naive_rehearsal")}

    def first_task(results, workdir):
        lines = [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]
        losses_ = [(x["step"], x["loss"]) for x in lines
                   if x.get("task") == 1 and "phase" not in x and "loss" in x]
        return results["repeats"][0]["R_global"][0], losses_

    bic, rehearsal = first_task(*runs["bic"]), first_task(*runs["naive_rehearsal"])
    assert len(bic[1]) > 1 and bic == rehearsal


@pytest.mark.slow
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


@pytest.mark.slow
def test_replay_methods_count_their_generator(digits_data_dir, tmp_path, session):
    results = experiment.run(tiny_config(digits_data_dir, method="abd", epochs=1, num_tasks=2),
                             tmp_path, session=session)
    memory = results["repeats"][0]["memory"]
    assert memory["generator_parameters"] > memory["classifier_parameters"] > 0
    assert "stored_images" not in memory


@pytest.mark.slow
def test_interrupt_in_a_host_stage_reruns_it_identically(digits_data_dir, reference_run,
                                                         tmp_path, monkeypatch, session):
    """A crash inside Naive Rehearsal's memory update after task 2 (an `Update` stage): the
    rerun does that stage again from the checkpoint taken when training ended."""
    config = three_task_config(digits_data_dir, "naive_rehearsal")
    reference, _ = reference_run(config)
    real, calls = coreset.release_redraw, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(coreset, "release_redraw", crashing)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(config, tmp_path, session=session)
    monkeypatch.setattr(coreset, "release_redraw", real)
    resumed = experiment.run(config, tmp_path, session=session)
    assert [r["R_global"] for r in resumed["repeats"]] == [
        r["R_global"] for r in reference["repeats"]]


@pytest.mark.slow
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
    real = services.RepeatServices.log

    def crashing(self, step, scalars, **tags):
        if tags.get("phase") == phase and tags.get("task") == 2 and step == 2:
            raise KeyboardInterrupt
        return real(self, step, scalars, **tags)

    monkeypatch.setattr(services.RepeatServices, "log", crashing)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(config, tmp_path, session=session)
    monkeypatch.setattr(services.RepeatServices, "log", real)
    from abd_jax import checkpoint as ckpt_lib
    checkpointer = ckpt_lib.RunCheckpointer(tmp_path / "checkpoints" / "repeat_0")
    assert checkpointer.latest() == (1, ckpt_lib.stage_step(stage, 1))
    checkpointer.close()
    resumed = experiment.run(config, tmp_path, session=session)
    assert [r["R_global"] for r in resumed["repeats"]] == [
        r["R_global"] for r in reference["repeats"]]
