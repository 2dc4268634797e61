"""The shared training step: data parallelism, jit equivalence, schedule, batching."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abd_jax import augment, experiment, methods, models, plan, sampling, train
from abd_jax.methods import base, lwf
from abd_jax.methods.teacher import TeacherState, freeze

NUM_CLASSES = 6
IMAGE_SHAPE = (8, 8, 3)


def _setup(loss_fn=base.ce, batch_size=8, chunk=2, mesh_devices=1, with_teacher=False,
           session=None):
    from abd_jax.session import Session
    session = session or Session()
    model = models.CifarResNet(depth=8, num_classes=NUM_CLASSES, width=4)
    cfg = train.StepConfig(batch_size=batch_size, lr_decay=0.1,
                           augment=augment.AugmentConfig(), mean=(0.5,) * 3, std=(0.25,) * 3)
    mesh = experiment.make_mesh(mesh_devices)
    tx = train.learner_optimizer(session, 0.1, 0.9, 2e-4)
    state = train.create_train_state(session, model, jax.random.PRNGKey(0), IMAGE_SHAPE, tx)
    rng = np.random.RandomState(0)
    images = jnp.asarray(rng.randint(0, 256, (40, *IMAGE_SHAPE)), jnp.uint8)
    labels = jnp.asarray(np.repeat(np.arange(NUM_CLASSES), 7)[:40], jnp.int32)
    index = jnp.asarray(np.r_[np.arange(20, 40), np.zeros(10)], jnp.int32)
    task = sampling.TaskInfo(index=index, count=jnp.int32(20), num_old=jnp.int32(3),
                             num_seen=jnp.int32(6), steps_per_epoch=jnp.int32(20 // batch_size),
                             total_steps=jnp.int32(3), key=jax.random.PRNGKey(1),
                             base_lr=jnp.float32(0.1),
                             lr_milestones=jnp.asarray(sampling.lr_milestones((1,), 1)),
                             cosine_epochs=jnp.int32(0))
    frozen = TeacherState(freeze(state)) if with_teacher else None
    fn = train.make_train_chunk(model, loss_fn, cfg, mesh, chunk)
    return fn, state, frozen, images, labels, task


@pytest.mark.slow
def test_one_and_four_devices_agree():
    """LwF's step (the CE of every method plus a frozen teacher's forward) on one device and
    data-parallel on four (with synthetic replay: tests/test_synthesis.py)."""
    assert jax.device_count() >= 4, "tests/conftest.py should provide 4 host devices"
    loss_fn = functools.partial(lwf.lwf_loss, mu=1.0, temperature=2.0)
    outs = []
    for n in (1, 4):
        fn, state, frozen, images, labels, task = _setup(loss_fn, mesh_devices=n,
                                                         with_teacher=True)
        outs.append(jax.jit(fn)(state, frozen, sampling.DeviceData(images, labels), task))
    (s1, m1), (s4, m4) = outs
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(s1.params, s4.params, rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(s1.batch_stats, s4.batch_stats, rtol=1e-4, atol=1e-6)
    assert not np.allclose(jax.tree.leaves(s1.params)[0],
                           jax.tree.leaves(_setup()[1].params)[0]), "params did not change"


@pytest.mark.slow
class JitEquivalenceTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_train_chunk(self):
        fn, state, frozen, images, labels, task = _setup()
        new_state, metrics = self.variant(fn)(state, frozen, sampling.DeviceData(images, labels), task)
        ref_state, ref_metrics = jax.jit(fn)(state, frozen, sampling.DeviceData(images, labels), task)
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
        chex.assert_trees_all_close(new_state.params, ref_state.params, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_chunk_stops_at_total_steps_and_schedule_decays():
    fn, state, frozen, images, labels, task = _setup(chunk=5)  # total_steps=3
    new_state, metrics = jax.jit(fn)(state, frozen, sampling.DeviceData(images, labels), task)
    assert int(new_state.step) == 3
    np.testing.assert_array_equal(metrics["active"], [1, 1, 1, 0, 0])
    # 2 steps per epoch, milestone after epoch 1: steps 0,1 at 0.1, step 2 at 0.01.
    np.testing.assert_allclose(metrics["lr"][:3], [0.1, 0.1, 0.01], rtol=1e-6)


def test_batches_cover_the_task_once_per_epoch():
    _, _, _, images, labels, task = _setup(batch_size=5)
    task = task.replace(steps_per_epoch=jnp.int32(4))
    seen = []
    for step in range(4):
        _, y = sampling.sample_batch(jnp.arange(40), jnp.arange(40), task, step, 5)
        seen.extend(np.asarray(y).tolist())
    assert sorted(seen) == list(range(20, 40))  # every task example exactly once, no padding
    _, y_next = sampling.sample_batch(jnp.arange(40), jnp.arange(40), task, 4, 5)
    assert sorted(np.asarray(y_next)) != sorted(seen[:5])  # new epoch, new order


def test_a_longer_index_gives_the_same_batches():
    """Runs pad `TaskInfo.index` to `plan.shared_capacity` (so runs of other task sizes
    share a compiled step): the padding must not change any batch."""
    _, _, _, _, _, task = _setup(batch_size=5)
    task = task.replace(steps_per_epoch=jnp.int32(4))
    longer = task.replace(index=jnp.concatenate([task.index, jnp.zeros(2000, jnp.int32)]))
    for step in (0, 3, 4, 9):
        chex.assert_trees_all_equal(sampling.batch_indices(task, step, 5),
                                    sampling.batch_indices(longer, step, 5))
    assert [plan.shared_capacity(n) for n in (0, 288, 2048, 2049, 5000)] == [
        2048, 2048, 2048, 4096, 8192]


def test_unknown_method_names_the_choices():
    import ml_collections
    with pytest.raises(ValueError, match="choose one of"):
        methods.get_method(ml_collections.ConfigDict({"method": "nope"}))


@pytest.mark.slow
def test_skipping_by_mask_equals_skipping_by_cond():
    """Both ways of skipping the steps past `total_steps` (3) in a 5-step chunk agree."""
    _, state, frozen, images, labels, task = _setup()
    outs = []
    for skip in ("cond", "mask"):
        model = models.CifarResNet(depth=8, num_classes=NUM_CLASSES, width=4)
        cfg = train.StepConfig(batch_size=8, lr_decay=0.1,
                               augment=augment.AugmentConfig(), mean=(0.5,) * 3,
                               std=(0.25,) * 3)
        fn = train.make_train_chunk(model, base.ce, cfg,
                                    experiment.make_mesh(1), 5, skip)
        outs.append(jax.jit(fn)(state, frozen, sampling.DeviceData(images, labels), task))
    (s_cond, m_cond), (s_mask, m_mask) = outs
    assert int(s_mask.step) == 3
    np.testing.assert_array_equal(m_mask["active"], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(m_mask["loss"][3:], 0.0)
    chex.assert_trees_all_close(m_cond, m_mask, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(s_cond.params, s_mask.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(s_cond.opt_state, s_mask.opt_state, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="skip"):
        train.fuse_steps(lambda s: (s, {}), 2, "while")


def test_learning_rate_steps_at_milestones_or_anneals_by_cosine():
    """Milestones: lr x lr_decay after each listed epoch. Cosine (PyTorch's
    CosineAnnealingLR, T_max = epochs, stepped per epoch): lr (1 + cos(pi e / E)) / 2."""
    cfg = train.StepConfig(batch_size=4, lr_decay=0.1, augment=augment.AugmentConfig(),
                           mean=(0.5,), std=(0.25,))
    info = lambda milestones, cosine: sampling.TaskInfo(
        index=jnp.zeros(8, jnp.int32), count=jnp.int32(8), num_old=jnp.int32(0),
        num_seen=jnp.int32(2), steps_per_epoch=jnp.int32(2), total_steps=jnp.int32(8),
        key=jax.random.PRNGKey(0), base_lr=jnp.float32(0.1),
        lr_milestones=jnp.asarray(sampling.lr_milestones(milestones, 2)),
        cosine_epochs=jnp.int32(cosine))
    rates = lambda task: [float(train.learning_rate(jnp.int32(s), task, cfg.lr_decay))
                          for s in range(8)]
    np.testing.assert_allclose(rates(info((1, 3), 0)),
                               [0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
    want = [0.1, 0.1, 0.0853553, 0.0853553, 0.05, 0.05, 0.0146447, 0.0146447]
    np.testing.assert_allclose(rates(info((), 4)), want, rtol=1e-5)
    assert plan.Schedule(4, 0.1, cosine=True).cosine
