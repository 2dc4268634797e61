"""Model inversion and the synthetic-replay learners (docs/algorithm.md §3-6)."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from abd_jax import (augment, data, driver, experiment, generators, losses, methods, models, sampling,
                     synthesis, train)
from abd_jax.methods import abd, synthetic_replay
from abd_jax.methods.teacher import FrozenModel
from abd_jax.preemption import StopRequests
from configs import digits

IMAGE_SHAPE = (8, 8, 3)
NUM_CLASSES = 6


def _teacher(session, depth=8, width=4):
    model = models.CifarResNet(depth=depth, num_classes=NUM_CLASSES, width=width)
    variables = models.init_variables(session, model, jax.random.PRNGKey(0), (1, *IMAGE_SHAPE),
                                      train=False)
    return model, FrozenModel(variables["params"], variables["batch_stats"])


def _sown_stats(model, teacher, x):
    _, sown = model.apply({"params": teacher.params, "batch_stats": teacher.batch_stats}, x,
                          train=False, mutable=[models.BN_INPUTS])
    return sown[models.BN_INPUTS]


def _alignment(model, teacher, x):
    pairs = synthesis.bn_layer_stats(_sown_stats(model, teacher, x), teacher.batch_stats)
    return losses.bn_alignment_loss(pairs)


@pytest.mark.slow
def test_resnet32_sows_the_input_stats_of_all_31_bn_layers(session):
    model = models.CifarResNet(depth=32, num_classes=10)
    variables = models.init_variables(session, model, jax.random.PRNGKey(0), (1, 32, 32, 3),
                                      train=False)
    teacher = FrozenModel(variables["params"], variables["batch_stats"])
    sown = _sown_stats(model, teacher, jnp.ones((2, 32, 32, 3)))
    assert len(traverse_util.flatten_dict(sown)) == 31
    assert len(traverse_util.flatten_dict(teacher.batch_stats)) == 62  # mean + var each


def test_bn_alignment_is_zero_when_running_stats_match_the_batch(session):
    model, teacher = _teacher(session)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, *IMAGE_SHAPE))
    assert _alignment(model, teacher, x) > 0
    # Layer l's input depends only on layers < l, so L passes reach the fixed point.
    stats = teacher.batch_stats
    for _ in range(8):
        sown = traverse_util.flatten_dict(_sown_stats(model, teacher, x))
        flat = {}
        for path, ((mean, var),) in sown.items():
            flat[path[:-1] + ("mean",)] = mean
            flat[path[:-1] + ("var",)] = var
        stats = traverse_util.unflatten_dict(flat)
        teacher = teacher.replace(batch_stats=stats)
    kl = _alignment(model, teacher, x)
    np.testing.assert_allclose(kl, 0.0, atol=1e-5)


def _synthesis_setup(session, mesh_devices, iterations=2):
    model, teacher = _teacher(session)
    cfg = synthesis.SynthesisConfig(iterations=iterations, batch_size=8, z_dim=16)
    generator = generators.create_generator(8, 3, cfg.z_dim, cfg.inner_bn_eps)
    mesh = experiment.make_mesh(mesh_devices)
    synth = synthesis.Synthesizer(session, cfg, generator, model, mesh, steps_per_call=1)
    return synth, synth.init(jax.random.PRNGKey(2)), teacher


@pytest.mark.slow
def test_generator_step_one_and_four_devices_agree(session):
    outs = []
    for n in (1, 4):
        synth, gen_state, teacher = _synthesis_setup(session, n)
        state, metrics = synth.fused_step(gen_state, *synth.step_args(10, teacher, 4, [0, 3]))
        outs.append((state, metrics))
    (s1, m1), (s4, m4) = outs
    for term in ("loss", "content", "diversity", "stat_alignment", "smoothness"):
        np.testing.assert_allclose(m1[term], m4[term], rtol=1e-4, atol=1e-6, err_msg=term)
    # A bias feeding straight into BatchNorm has a zero gradient up to rounding, which Adam's
    # first step turns into +-lr of arbitrary sign: compare every other parameter.
    flat1, flat4 = (traverse_util.flatten_dict(s.params) for s in (s1, s4))
    cancelled = {("fc", "bias"), ("conv1", "bias"), ("conv2", "bias")}
    assert cancelled < set(flat1)
    for path in set(flat1) - cancelled:
        np.testing.assert_allclose(flat1[path], flat4[path], rtol=1e-4, atol=1e-6,
                                   err_msg=str(path))
    chex.assert_trees_all_close(s1.batch_stats, s4.batch_stats, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_generator_training_lowers_its_loss_and_logs_terms(session):
    """The generator's loop through the shared driver: logs every 20 iterations."""
    synth, gen_state, teacher = _synthesis_setup(session, 1, iterations=60)
    logged = []
    loop = driver.DrivenLoop("generator", synth.fused_step,
                             synth.step_args(60, teacher, 4, [0, 5]), 0, 60, 1)
    hooks = driver.Hooks(stop=StopRequests(), log=lambda it, terms: logged.append((it, terms)),
                         log_every=20)
    gen_state, _, _ = driver.drive(loop, gen_state, hooks)
    assert [it for it, _ in logged] == [20, 40, 60] and int(gen_state.step) == 60
    assert logged[-1][1]["loss"] < logged[0][1]["loss"]
    assert set(logged[0][1]) == {"loss", "content", "diversity", "stat_alignment", "smoothness"}


def _learner_setup(session, method_name, mesh_devices, chunk=2, **overrides):
    """(the jittable chunk of `chunk` steps of the method's task-2 loss, its arguments,
    method, model): chunk 2 is the fused `lax.scan` path of GPU/TPU runs, 1 the CPU path."""
    config = digits.get_config()
    config.method = method_name
    config.synthesis.z_dim = 16
    for k, v in overrides.items():
        config.abd[k] = v
    spec = dataclasses.replace(data.get_spec("digits"), image_shape=IMAGE_SHAPE)
    method = methods.get_method(config, spec)
    model, teacher = _teacher(session)
    tx = train.learner_optimizer(session, 0.1, 0.9, 2e-4)
    state = train.create_train_state(session, model, jax.random.PRNGKey(7), IMAGE_SHAPE, tx)
    mesh = experiment.make_mesh(mesh_devices)
    rt = methods.Runtime(config=config, plan=None, model=model, mesh=mesh,
                         image_shape=IMAGE_SHAPE, steps_per_call=1,
                         method_key=np.array([0, 8], np.uint32), session=session)
    method_state = method.init_state(rt, state).replace(teacher=teacher)
    cfg = train.StepConfig(batch_size=8, lr_decay=0.1,
                           augment=augment.AugmentConfig(),
                           mean=(0.5,) * 3, std=(0.25,) * 3)
    rng = np.random.RandomState(0)
    images = jnp.asarray(rng.randint(0, 256, (24, *IMAGE_SHAPE)), jnp.uint8)
    labels = jnp.asarray(rng.randint(3, 6, 24), jnp.int32)
    task = sampling.TaskInfo(index=jnp.arange(24, dtype=jnp.int32), count=jnp.int32(24),
                             num_old=jnp.int32(3), num_seen=jnp.int32(6),
                             steps_per_epoch=jnp.int32(3), total_steps=jnp.int32(2),
                             key=jax.random.PRNGKey(9), base_lr=jnp.float32(0.1),
                             lr_milestones=jnp.zeros(0, jnp.int32),
                             cosine_epochs=jnp.int32(0))
    loss_fn = method.loss_fn(methods.Task(index=1, num_tasks=2, num_old=3, num_seen=6))
    step = train.make_train_chunk(model, loss_fn, cfg, mesh, chunk)
    return step, state, (method_state, sampling.DeviceData(images, labels), task), method, model


@pytest.mark.slow
def test_learner_step_one_and_four_devices_agree(session):
    """ABD's fused steps (synthetic replay sampled inside the step) on one device and
    data-parallel on four; the other losses differ only in terms of the same outputs."""
    outs = []
    for n in (1, 4):
        step, state, args, _, _ = _learner_setup(session, "abd", n)
        outs.append(jax.jit(step)(state, *args))
    (s1, m1), (s4, m4) = outs
    assert "ft_ce" in m1
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(s1.params, s4.params, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("ablation", [{}, {"task_balancing": False}, {"local_ce": False},
                                      {"kd_on_real": False}, {"kd_on_synthetic": False},
                                      {"ft_ce": False}, {"mu": 0.5}])
def test_abd_config_switches_reach_the_learners_loss(ablation):
    """Table 3's rows are `--config.abd.*` switches: each reaches the loss of every later task
    (what each switch changes in the loss: tests/test_loss_values.py)."""
    config = digits.get_config()
    config.abd.update(ablation)
    method = methods.get_method(config, data.get_spec("digits"))
    expected = dataclasses.replace(abd.AbdOptions(**digits.get_config().abd.to_dict()),
                                   **ablation)
    for index in (1, 4):
        loss = method.loss_fn(methods.Task(index=index, num_tasks=5, num_old=2 * index,
                                           num_seen=2 * index + 2))
        assert dict(loss.kwargs)["opts"] == expected


@pytest.mark.slow
def test_abd_without_ft_ce_trains_and_logs_no_ft_ce(session):
    step, state, args, _, _ = _learner_setup(session, "abd", 1, chunk=1, ft_ce=False)
    _, metrics = jax.jit(step)(state, *args)
    assert np.isfinite(metrics["loss"]).all() and "ft_ce" not in metrics


def _ctx(session, method_name="abd"):
    step, state, (method_state, data, task), method, model = _learner_setup(session,
                                                                            method_name, 1)
    labels = data.labels
    x = jax.random.normal(jax.random.PRNGKey(10), (8, *IMAGE_SHAPE))

    def forward(images, params=state.params):
        (logits, feats), upd = model.apply({"params": params, "batch_stats": state.batch_stats},
                                           images, train=True, mutable=["batch_stats"])
        return logits, feats, upd["batch_stats"]

    ctx = train.LossContext(
        forward=forward, model=model, params=state.params, batch_stats=state.batch_stats,
        inputs=method_state, images=x,
        labels=labels[:8], num_old=jnp.int32(3), num_seen=jnp.int32(6),
        rng=jax.random.PRNGKey(11))
    return ctx, method, model, state


def test_synthetic_labels_lie_in_the_past_classes(session):
    ctx, method, _, _ = _ctx(session)
    replay = synthetic_replay.replay(ctx, method.generator, 16)
    y_syn = np.asarray(replay.labels[8:])
    assert replay.images.shape == (16, *IMAGE_SHAPE)
    assert (y_syn >= 0).all() and (y_syn < 3).all()
    np.testing.assert_array_equal(replay.labels[:8], ctx.labels)


def _split_head(grads):
    flat = traverse_util.flatten_dict(grads)
    head = [v for k, v in flat.items() if k[0] == "head"]
    backbone = [v for k, v in flat.items() if k[0] != "head"]
    return head, backbone


def test_ft_ce_reaches_only_the_head(session):
    ctx, _, _, state = _ctx(session)
    y = jnp.array([0, 1, 2, 3, 4, 5, 3, 4])

    def loss(params):
        _, feats, _ = ctx.forward(ctx.images, params)
        w = losses.task_balancing_weights(y, 3, 6)
        head = params["head"]
        return losses.head_finetune_ce(feats, head["kernel"], head["bias"], y, w, 6)

    head, backbone = _split_head(jax.jit(jax.grad(loss))(state.params))
    assert all(np.all(np.asarray(g) == 0) for g in backbone)
    assert any(np.abs(np.asarray(g)).sum() > 0 for g in head)


def test_feature_kd_gives_the_head_no_gradient(session):
    ctx, _, _, state = _ctx(session)
    teacher = ctx.inputs.teacher
    teacher_feats = synthesis.frozen_apply(ctx.model, teacher, ctx.images)[1]
    kernel = teacher.params["head"]["kernel"]

    def loss(params):
        _, feats, _ = ctx.forward(ctx.images, params)
        return losses.feature_kd_loss(feats, teacher_feats, kernel, num_old=3)

    head, backbone = _split_head(jax.jit(jax.grad(loss))(state.params))
    assert all(np.all(np.asarray(g) == 0) for g in head)
    assert any(np.abs(np.asarray(g)).sum() > 0 for g in backbone)


@pytest.mark.slow
def test_bfloat16_generator_keeps_float32_parameters_images_and_teacher(session):
    """generator_dtype=bfloat16 (the default under --config.dtype=bfloat16): G computes in
    bfloat16, its parameters, Adam state and images stay float32, the teacher's forward is
    float32, and the loss terms are close to a float32 G's from the same state, not equal."""
    model, teacher = _teacher(session)
    mesh = experiment.make_mesh(1)
    terms, states = {}, {}
    for dtype in ("float32", "bfloat16"):
        cfg = synthesis.SynthesisConfig(iterations=1, batch_size=8, z_dim=16,
                                        generator_dtype=dtype)
        generator = generators.create_generator(8, 3, cfg.z_dim, cfg.inner_bn_eps, dtype)
        synth = synthesis.Synthesizer(session, cfg, generator, model.clone(dtype=jnp.bfloat16),
                                      mesh, 1)
        assert synth.model.dtype == jnp.float32
        state = synth.init(jax.random.PRNGKey(2))
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        images = synthesis.sample_images(generator, variables, jax.random.PRNGKey(5), 4,
                                         cfg.z_dim)
        chex.assert_type(images, jnp.float32)
        states[dtype], terms[dtype] = synth.fused_step(state, *synth.step_args(1, teacher, 4,
                                                                               [0, 3]))
    chex.assert_trees_all_equal_dtypes(states["bfloat16"].params, states["float32"].params)
    chex.assert_trees_all_equal_dtypes(states["bfloat16"].opt_state,
                                       states["float32"].opt_state)
    chex.assert_type(jax.tree.leaves(states["bfloat16"].params), jnp.float32)
    chex.assert_trees_all_close(terms["float32"], terms["bfloat16"], rtol=0.05, atol=1e-3)
    differs = [not np.allclose(terms["float32"][k], terms["bfloat16"][k], rtol=1e-6)
               for k in terms["float32"] if k != "active"]
    assert any(differs), "a bfloat16 generator gave float32's terms: dtype not applied"


@pytest.mark.parametrize("dtype, generator_dtype, expected", [
    ("float32", "", jnp.float32), ("bfloat16", "", jnp.bfloat16),
    ("bfloat16", "float32", jnp.float32)])
def test_generator_dtype_follows_the_config(dtype, generator_dtype, expected):
    """"" = the classifier's --config.dtype; an explicit generator_dtype wins."""
    config = digits.get_config()
    config.dtype, config.synthesis.generator_dtype = dtype, generator_dtype
    method = methods.get_method(config, data.get_spec("digits"))
    assert method.generator.dtype == expected


def test_bad_generator_dtype_names_the_setting():
    with pytest.raises(ValueError, match="generator_dtype"):
        generators.create_generator(8, 3, 16, dtype="float16")


@pytest.mark.slow
def test_bfloat16_classifier_is_inverted_in_float32(session):
    """With --config.dtype=bfloat16 the teacher's forward during synthesis (and so the
    stat-alignment KL) still runs in float32: same terms as a float32 classifier."""
    model, teacher = _teacher(session)
    cfg = synthesis.SynthesisConfig(iterations=1, batch_size=8, z_dim=16)
    generator = generators.create_generator(8, 3, cfg.z_dim, cfg.inner_bn_eps)
    mesh = experiment.make_mesh(1)
    terms = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        synth = synthesis.Synthesizer(session, cfg, generator, model.clone(dtype=dtype), mesh, 1)
        assert synth.model.dtype == jnp.float32
        _, metrics = synth.fused_step(synth.init(jax.random.PRNGKey(2)),
                                      *synth.step_args(1, teacher, 4, [0, 3]))
        terms[dtype] = metrics
    chex.assert_trees_all_close(terms[jnp.float32], terms[jnp.bfloat16], rtol=1e-6, atol=1e-7)
    # The check can fail: the same term computed by a bfloat16 teacher is visibly different.
    z = jax.random.normal(jax.random.PRNGKey(4), (8, 16))
    gen_vars = models.init_variables(session, generator, jax.random.PRNGKey(2), z, train=False)
    loss = jax.jit(synthesis.generator_loss, static_argnums=(2, 3, 6, 7))
    kl = {dtype: loss(gen_vars["params"], gen_vars["batch_stats"],
                                          generator, model.clone(dtype=dtype), teacher, z, 4,
                                          cfg)[1][1]["stat_alignment"]
          for dtype in (jnp.float32, jnp.bfloat16)}
    assert abs(float(kl[jnp.float32]) - float(kl[jnp.bfloat16])) > 1e-4 * abs(
        float(kl[jnp.float32]))
