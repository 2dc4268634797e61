"""R-DFCIL (as its release runs it): the loss terms against hand and float64 numpy values, the
complete main and head fine-tuning losses on a tiny classifier and generator, the head
setting, and a run's task-boundary behaviour (head-only fine-tuning on the task's counts, a
fresh generator every task, new RKD projections and head columns every task).

The tiny setting has 12 classes in 4 tasks of s = 3 and is at its third task (K_old = 6,
K_new = 9), so alpha = log2(2.5) and beta = sqrt(2) both differ from 1 (a swapped or dropped
factor shows) and there are unseen columns (masks show).
"""
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from abd_jax import config as config_lib
from abd_jax import experiment, losses, methods, train
from abd_jax.methods import rdfcil
from abd_jax.methods.lifecycle import HeadStage
from abd_jax.methods.synthetic_replay import replay
from abd_jax.methods.teacher import FrozenModel
from abd_jax.synthesis import frozen_apply
from configs import digits
from helpers import TinyGenerator, TinyNet, ce64, three_task_config

pytestmark = pytest.mark.xdist_group("rdfcil")

NUM_CLASSES, S, K_OLD, K_NEW, B, Z_DIM = 12, 3, 6, 9, 5, 8
ALPHA, BETA = math.log2(S / 2 + 1), math.sqrt(K_OLD / S)
TOL = dict(rtol=2e-5, atol=2e-6)  # a float32 step against the float64 formula
OPTS = rdfcil.RdfcilOptions()


def _check(got, want):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **TOL)


# ------------------------------------------------------------------ float64 numpy references
def _angles(x):
    """angle[a, b, c] = <unit(x_b - x_a), unit(x_c - x_a)> by loops (zero vectors stay 0)."""
    x = np.asarray(x, np.float64)
    n = len(x)
    unit = np.zeros((n, n, x.shape[1]))
    for a in range(n):
        for b in range(n):
            d = x[b] - x[a]
            unit[a, b] = d / max(np.linalg.norm(d), 1e-12)
    return np.array([[[unit[a, b] @ unit[a, c] for c in range(n)] for b in range(n)]
                     for a in range(n)])


# ----------------------------------------------------------------------- the loss functions
def test_rdfcil_weights_hand_values():
    """s = 3, K_old = 6: alpha = log2(2.5) = 1.3219, beta = sqrt(2) = 1.4142. s is the task's
    own class count: after a warm-start first task of 6, a step of 2 has s = 2: alpha = 1,
    beta = sqrt(3)."""
    w_ce, w_hkd, w_rkd = losses.rdfcil_weights(0.5, 0.15, 0.5, jnp.int32(K_OLD),
                                               jnp.int32(K_OLD + S))
    _check(w_ce, 0.5 * (1 + 1 / 1.3219280948873624) / 1.4142135623730951)
    _check(w_hkd, 0.15 * 1.3219280948873624 * 1.4142135623730951)
    _check(w_rkd, 0.5 * 1.3219280948873624 * 1.4142135623730951)
    w_ce, w_hkd, _ = losses.rdfcil_weights(0.5, 0.15, 0.5, jnp.int32(6), jnp.int32(8))
    _check(w_ce, 0.5 * 2 / 3 ** 0.5)
    _check(w_hkd, 0.15 * 3 ** 0.5)


def test_logit_l1_hand_value_and_masks():
    """mean |z_s - z_t| over the B x K_old entries; other columns and the teacher get no
    gradient."""
    s = jnp.array([[1.0, 2.0, 9.0], [0.0, -1.0, -9.0]])
    t = jnp.array([[0.5, 2.5, 0.0], [1.0, 1.0, 0.0]])
    _check(losses.logit_l1_loss(s, t, 2), (0.5 + 0.5 + 1.0 + 2.0) / 4)
    gs, gt = jax.grad(lambda a, b: losses.logit_l1_loss(a, b, 2), argnums=(0, 1))(s, t)
    np.testing.assert_array_equal(np.asarray(gs)[:, 2], 0.0)
    np.testing.assert_array_equal(np.asarray(gt), 0.0)
    np.testing.assert_allclose(np.asarray(gs)[:, :2], [[0.25, -0.25], [-0.25, -0.25]])


def test_rkd_angle_loss_matches_the_triplet_loops():
    student = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
    teacher = jax.random.normal(jax.random.PRNGKey(1), (5, 4))
    want = np.mean(np.abs(_angles(student) - _angles(teacher)))
    _check(losses.rkd_angle_loss(student, teacher), want)
    # invariant to translating and scaling either side, zero against itself
    _check(losses.rkd_angle_loss(3.0 * student + 1.0, teacher), want)
    _check(losses.rkd_angle_loss(student, student), 0.0)


def test_rkd_angle_gradient_matches_finite_differences():
    """Both sides get the loss's gradient (R-DFCIL trains both projections); the zero
    differences (b = a, and two equal embeddings) add nothing to it, so float32 keeps it."""
    student = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    teacher = jax.random.normal(jax.random.PRNGKey(2), (4, 3))
    gs, gt = jax.grad(losses.rkd_angle_loss, argnums=(0, 1))(student, teacher)
    loss = lambda s, t: np.mean(np.abs(_angles(s) - _angles(t)))
    s64, t64, eps = np.asarray(student, np.float64), np.asarray(teacher, np.float64), 1e-6
    for grad, which in ((gs, 0), (gt, 1)):
        numeric = np.zeros((4, 3))
        for i in range(4):
            for j in range(3):
                step = np.zeros((4, 3))
                step[i, j] = eps
                args = [(s64, t64), (s64 + step, t64), (s64, t64 + step)]
                numeric[i, j] = (loss(*args[1 + which]) - loss(*args[0])) / eps
        np.testing.assert_allclose(np.asarray(grad), numeric, rtol=1e-3, atol=1e-5)
    repeated = student.at[1].set(student[0])
    chex.assert_tree_all_finite(jax.grad(losses.rkd_angle_loss)(repeated, teacher))


@jax.custom_jvp
def _torch_abs(x):
    return jnp.abs(x)


@_torch_abs.defjvp
def _torch_abs_jvp(primals, tangents):
    """PyTorch's |x|' = sgn(x), 0 at 0 (`jnp.abs`'s is 1 there)."""
    (x,), (dx,) = primals, tangents
    return jnp.abs(x), jnp.sign(x) * dx


def _release_rkd(student, teacher):
    """cl-lite's `RKDAngleLoss` after its projections: F.normalize(d) = d / max(||d||, 1e-12)
    (its norm's gradient 0 at a zero vector, so d / 1e-12 there), bmm, L1 with sgn(0) = 0."""
    def angles(x):
        d = x[None] - x[:, None]
        square = jnp.sum(d * d, axis=-1, keepdims=True)
        norm = jnp.where(square > 0, jnp.sqrt(jnp.where(square > 0, square, 1.0)), 0.0)
        unit = d / jnp.maximum(norm, 1e-12)
        return jnp.einsum("abd,acd->abc", unit, unit)

    return jnp.mean(_torch_abs(angles(student) - angles(teacher)))


def test_rkd_angle_gradient_at_zero_differences_is_the_releases():
    """At b = a and at rows repeated on both sides the release's clamped division has slope
    1e12, which its L1's sgn(0) = 0 cancels: its float32 gradient is finite and equals the
    zero gradient `_angles` gives there."""
    student = jax.random.normal(jax.random.PRNGKey(0), (6, 4))
    teacher = jax.random.normal(jax.random.PRNGKey(2), (6, 4))
    student, teacher = student.at[3].set(student[1]), teacher.at[3].set(teacher[1])
    ours = jax.grad(losses.rkd_angle_loss, argnums=(0, 1))(student, teacher)
    release = jax.grad(_release_rkd, argnums=(0, 1))(student, teacher)
    chex.assert_trees_all_close(ours, release, rtol=1e-5, atol=1e-8)
    assert all(np.abs(np.asarray(g)).max() > 1e-3 for g in ours)


def test_class_balance_weights_hand_values():
    """counts (10, 5, 0, 20 | 7 unseen): n = 35, 35 / (10, 5, 1, 20) = (3.5, 7, 35, 1.75),
    over the minimum 1.75: (2, 4, 20, 1); unseen columns weigh 1."""
    w = losses.class_balance_weights(jnp.array([10.0, 5.0, 0.0, 20.0, 7.0]), 4)
    np.testing.assert_allclose(np.asarray(w), [2.0, 4.0, 20.0, 1.0, 1.0], rtol=1e-6)


def test_class_weighted_ce_hand_value():
    """sum_i w_{y_i} CE_i / sum_i w_{y_i}: two samples, CE ln 2 (w 3) and ln 3 (w 1)."""
    logits = jnp.array([[0.0, 0.0, -1e9], [0.0, 0.0, 0.0]])
    loss = losses.class_weighted_ce_loss(logits, jnp.array([0, 2]), jnp.array([3.0, 5.0, 1.0]))
    _check(loss, (3 * math.log(2) + math.log(3)) / 4)


# ------------------------------------------------------------------------------- the head
def _rdfcil_config(**rdfcil_settings):
    config = digits.get_config()
    config.method = "rdfcil"
    config.rdfcil.update(rdfcil_settings)
    return config


def test_the_head_setting_is_checked_and_decides_the_heads_bias():
    """per_task (the configs' default): no bias; shared: the model's head with its bias."""
    for head, keys in (("per_task", {"kernel"}), ("shared", {"kernel", "bias"})):
        model = methods.get_method(_rdfcil_config(head=head)).classifier(10)
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
        assert set(shapes["params"]["head"]) == keys
    with pytest.raises(ValueError, match=r"^--config.rdfcil.head='bias_free': use one of "
                                         r"per_task, shared$"):
        methods.get_method(_rdfcil_config(head="bias_free"))


def test_a_run_made_before_the_head_setting_resumes_only_with_the_shared_head(tmp_path):
    """A config.json without `rdfcil.head` stands for "shared", the head those runs had."""
    old = json.loads(_rdfcil_config().to_json())
    del old["rdfcil"]["head"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="rdfcil.head: 'shared' -> 'per_task'"):
        config_lib.check_or_write_fingerprint(
            tmp_path, json.loads(_rdfcil_config().to_json()), write=False)
    config_lib.check_or_write_fingerprint(
        tmp_path, json.loads(_rdfcil_config(head="shared").to_json()), write=False)


# --------------------------------------------------------- the complete losses on one step
@pytest.fixture(scope="module")
def setup():
    net, gen = TinyNet(NUM_CLASSES), TinyGenerator()
    x = jax.random.normal(jax.random.PRNGKey(0), (B, 4, 4, 1))
    y = jnp.array([6, 7, 8, 8, 6])
    student, teacher, backbone, gv, projection = jax.jit(lambda: (
        net.init(jax.random.PRNGKey(1), x, train=False),
        net.init(jax.random.PRNGKey(2), x, train=False),
        net.init(jax.random.PRNGKey(3), x, train=False),
        gen.init(jax.random.PRNGKey(4), jnp.zeros((2, Z_DIM)), train=False),
        rdfcil.projection_params(jax.random.PRNGKey(5), 5)))()
    params = {**student["params"], rdfcil.PROJECTION: projection}
    counts = jnp.arange(NUM_CLASSES, dtype=jnp.float32)  # counted before this step
    batch_stats = {**student["batch_stats"], rdfcil.COUNTS: counts}
    gen_state = train.TrainState.create(apply_fn=gen.apply, params=gv["params"],
                                        batch_stats=gv["batch_stats"], tx=optax.identity())
    state = rdfcil.RdfcilState(teacher=FrozenModel(teacher["params"], teacher["batch_stats"]),
                               generator=gen_state, head=None, backbone=None,
                               class_weights=None)
    backbone = FrozenModel(backbone["params"], backbone["batch_stats"])
    class_weights = jnp.linspace(1.0, 3.0, NUM_CLASSES)
    return dict(net=net, gen=gen, x=x, y=y, params=params, batch_stats=batch_stats,
                state=state, backbone=backbone, class_weights=class_weights)


def _ctx(s, inputs, params=None):
    params = s["params"] if params is None else params

    def forward(images, batch_stats=None):
        bs = s["batch_stats"] if batch_stats is None else batch_stats
        (logits, feats), upd = s["net"].apply({"params": params, "batch_stats": bs}, images,
                                              train=True, mutable=["batch_stats"])
        return logits, feats, upd["batch_stats"]

    return train.LossContext(forward=forward, model=s["net"], params=params,
                             batch_stats=s["batch_stats"], inputs=inputs,
                             images=s["x"], labels=s["y"], num_old=jnp.int32(K_OLD),
                             num_seen=jnp.int32(K_NEW), rng=jax.random.PRNGKey(6))


def _head(s):
    """A head other than the student's: where the fine-tuning may be part-way."""
    head = s["params"]["head"]
    return {"kernel": 1.5 * head["kernel"], "bias": head["bias"] + 0.25}


@pytest.fixture(scope="module")
def runs(setup):
    """Both losses on the step (one jitted call) and the values the hand computation reads."""
    s = setup
    inputs = rdfcil.FinetuneInputs(teacher=s["state"].teacher,
                                   generator_variables=s["state"].generator_variables,
                                   backbone=s["backbone"], class_weights=s["class_weights"])

    @jax.jit
    def run():
        ctx = _ctx(s, s["state"])
        rep = replay(ctx, s["gen"], Z_DIM)
        z_real, f_real, bs_real = ctx.forward(rep.images[:B])
        z_syn, _, bs_chained = ctx.forward(rep.images[B:], bs_real)
        f_backbone = frozen_apply(s["net"], s["backbone"], rep.images)[1]
        return dict(
            labels=rep.labels, tz=rep.teacher_logits, tf=rep.teacher_features, z_real=z_real,
            f_real=f_real, z_syn=z_syn, bs_chained=bs_chained,
            bs_syn_only=ctx.forward(rep.images[B:])[2], f_backbone=f_backbone,
            main=rdfcil.rdfcil_loss(ctx, s["gen"], Z_DIM, OPTS),
            finetune=rdfcil.finetune_loss(_ctx(s, inputs, params=_head(s)), s["gen"], Z_DIM,
                                          OPTS))

    out = run()
    chex.assert_tree_all_finite(out)
    return out


def test_replay_labels_real_new_classes_and_synthetic_old_ones(runs):
    y = np.asarray(runs["labels"])
    assert (y[:B] >= K_OLD).all() and (y[B:] < K_OLD).all()


def test_main_loss_matches_hand_computation(runs, setup):
    """w_ce CE over [K_old, K_new) of the real rows + w_hkd mean |z_syn - t_syn| over
    [0, K_old) + w_rkd RKD angles of the projected real features (student's through its
    projection, teacher's through the other), w = (0.5 (1 + 1/alpha) / beta, 0.15 alpha beta,
    0.5 alpha beta)."""
    f64 = lambda a: np.asarray(a, np.float64)
    y = np.asarray(runs["labels"])
    ce = np.mean(ce64(f64(runs["z_real"])[:, K_OLD:K_NEW], y[:B] - K_OLD))
    hkd = np.mean(np.abs(f64(runs["z_syn"])[:, :K_OLD] - f64(runs["tz"])[B:, :K_OLD]))
    proj = jax.tree.map(f64, setup["params"][rdfcil.PROJECTION])
    student = f64(runs["f_real"]) @ proj["student"]["kernel"] + proj["student"]["bias"]
    teacher = f64(runs["tf"])[:B] @ proj["teacher"]["kernel"] + proj["teacher"]["bias"]
    rkd = np.mean(np.abs(_angles(student) - _angles(teacher)))
    loss, _, metrics = runs["main"]
    _check(metrics["ce"], ce)
    _check(metrics["hkd"], hkd)
    _check(metrics["rkd"], rkd)
    _check(loss, 0.5 * (1 + 1 / ALPHA) / BETA * ce + 0.15 * ALPHA * BETA * hkd
           + 0.5 * ALPHA * BETA * rkd)


def test_main_loss_chains_both_forwards_statistics_and_counts_every_label(runs, setup):
    """The running statistics are updated by the real then the synthetic forward; the class
    counts gain one per real and synthetic label."""
    _, new_bs, _ = runs["main"]
    chained = {k: v for k, v in runs["bs_chained"].items() if k != rdfcil.COUNTS}
    chex.assert_trees_all_close({k: v for k, v in new_bs.items() if k != rdfcil.COUNTS},
                                chained)
    assert not np.allclose(new_bs["bn"]["mean"], runs["bs_syn_only"]["bn"]["mean"])
    want = np.arange(NUM_CLASSES) + np.bincount(np.asarray(runs["labels"]),
                                                minlength=NUM_CLASSES)
    np.testing.assert_array_equal(np.asarray(new_bs[rdfcil.COUNTS]), want)


def test_main_loss_gradients_reach_both_projections(setup):
    s = setup
    grads = jax.jit(jax.grad(lambda p: rdfcil.rdfcil_loss(
        _ctx(s, s["state"], params=p), s["gen"], Z_DIM, OPTS)[0]))(s["params"])
    for side in ("student", "teacher"):
        assert np.abs(np.asarray(grads[rdfcil.PROJECTION][side]["kernel"])).sum() > 0
    # the local CE and the HKD leave the head's unseen columns alone
    np.testing.assert_array_equal(np.asarray(grads["head"]["kernel"])[:, K_NEW:], 0.0)


def test_finetune_loss_matches_hand_computation(runs, setup):
    """0.5 * class-weighted CE over [0, K_new) of [x_real; x_syn] + 0.15 alpha beta HKD of
    the synthetic rows, logits f W + b of the frozen backbone's eval-mode features."""
    f64 = lambda a: np.asarray(a, np.float64)
    head = jax.tree.map(f64, _head(setup))
    z = f64(runs["f_backbone"]) @ head["kernel"] + head["bias"]
    y = np.asarray(runs["labels"])
    w = f64(setup["class_weights"])[y]
    ce = np.sum(w * ce64(z[:, :K_NEW], y)) / np.sum(w)
    hkd = np.mean(np.abs(z[B:, :K_OLD] - f64(runs["tz"])[B:, :K_OLD]))
    loss, new_bs, metrics = runs["finetune"]
    assert new_bs is None
    _check(metrics["ce"], ce)
    _check(metrics["hkd"], hkd)
    _check(loss, 0.5 * ce + 0.15 * ALPHA * BETA * hkd)


# ------------------------------------------------------------------------------------ a run
@pytest.mark.slow
def test_a_run_finetunes_the_head_on_its_counts_with_a_fresh_generator_per_task(
        digits_data_dir, tmp_path, monkeypatch, session):
    """Three tasks: after tasks 2 and 3 the head alone is fine-tuned (the backbone and its
    statistics untouched) with class weights from the task's label counts (B real labels of
    new classes and B synthetic ones of past classes per step); after tasks 1 and 2 a new
    generator takes exactly `iterations` steps; each later task draws new RKD projections.
    The per-task head has no bias; each task's start draws its columns N(0, 0.001^2) and
    leaves the earlier ones as they were; the later ones are 0 and stay 0 (no gradient, no
    weight decay) until their task."""
    config = three_task_config(digits_data_dir, "rdfcil")
    config.rdfcil.finetune_epochs = 1
    seen = {"finetune": [], "generator_steps": [], "projections": [], "heads": []}
    fetch = lambda tree: jax.tree.map(np.asarray, jax.device_get(tree))
    method_cls = rdfcil.RDFCIL
    real_inputs, real_end = method_cls.finetune_inputs, HeadStage.end
    real_samples, real_begin = method_cls.samples_and_teacher, method_cls.begin_task

    def finetune_inputs(self, rt, learner, state, task):
        learner, state = real_inputs(self, rt, learner, state, task)
        seen["finetune"].append({"task": task, "before": fetch((learner.params,
                                                                learner.batch_stats)),
                                 "weights": fetch(state.class_weights)})
        return learner, state

    def end(self, rt, learner, state, task):
        learner, state = real_end(self, rt, learner, state, task)
        seen["finetune"][-1]["after"] = fetch((learner.params, learner.batch_stats))
        return learner, state

    def samples(self, rt, learner, state, task):
        seen["generator_steps"].append(int(jax.device_get(state.generator.step)))
        return real_samples(self, rt, learner, state, task)

    def begin(self, rt, learner, state, task):
        before = fetch(learner.params["head"])
        learner, state = real_begin(self, rt, learner, state, task)
        seen["projections"].append(fetch(learner.params[rdfcil.PROJECTION]))
        seen["heads"].append((task, before, fetch(learner.params["head"])))
        return learner, state

    monkeypatch.setattr(method_cls, "finetune_inputs", finetune_inputs)
    monkeypatch.setattr(HeadStage, "end", end)
    monkeypatch.setattr(method_cls, "samples_and_teacher", samples)
    monkeypatch.setattr(method_cls, "begin_task", begin)
    experiment.run(config, tmp_path, session=session)

    assert seen["generator_steps"] == [config.synthesis.iterations] * 2
    assert [f["task"].index for f in seen["finetune"]] == [1, 2]
    for f in seen["finetune"]:
        (params, stats), (params_after, stats_after) = f["before"], f["after"]
        chex.assert_trees_all_equal({k: v for k, v in params.items() if k != "head"},
                                    {k: v for k, v in params_after.items() if k != "head"})
        chex.assert_trees_all_equal(stats, stats_after)
        assert not np.allclose(params["head"]["kernel"], params_after["head"]["kernel"])
        counts, task = stats[rdfcil.COUNTS], f["task"]
        real, synthetic = counts[task.num_old:task.num_seen].sum(), counts[:task.num_old].sum()
        assert real == synthetic > 0 and real % config.batch_size == 0
        assert counts[task.num_seen:].sum() == 0
        np.testing.assert_allclose(f["weights"], np.asarray(losses.class_balance_weights(
            jnp.asarray(counts), task.num_seen)))
    for task, before, after in seen["heads"]:
        assert set(after) == {"kernel"}
        lo, hi, new = task.num_old, task.num_seen, after["kernel"][:, task.num_old:task.num_seen]
        np.testing.assert_array_equal(after["kernel"][:, :lo], before["kernel"][:, :lo])
        np.testing.assert_array_equal(after["kernel"][:, hi:], 0.0)
        if not task.is_first:
            np.testing.assert_array_equal(before["kernel"][:, lo:], 0.0)
        assert abs(new.mean()) < 4 * rdfcil.HEAD_STD / np.sqrt(new.size)  # 64 x 2 draws
        np.testing.assert_allclose(new.std(), rdfcil.HEAD_STD, rtol=0.25)
    first, second, third = seen["projections"]
    assert not np.allclose(first["student"]["kernel"], second["student"]["kernel"])
    assert not np.allclose(second["student"]["kernel"], third["student"]["kernel"])
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = sorted({line["lr"] for line in lines if line.get("phase") == "head_finetuning"})
    assert lrs == [pytest.approx(config.lr * config.rdfcil.finetune_lr_scale)]
    assert {line["task"] for line in lines if line.get("phase") == "head_finetuning"} == {2, 3}
