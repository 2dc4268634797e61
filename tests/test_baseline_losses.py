"""The Table-2 baselines and DGR as the release runs them (docs/algorithm.md §6b): each method's
complete training loss, as the method calls it, against float64 numpy written out here from
the procedure; BiC's evaluation logits; E2E's and BiC's frozen-backbone stages train only
what they should.

One tiny classifier (8 classes, 4 tasks of 2) at its third task (K_old = 4, K_new = 6), so
that there are two past tasks (E2E's per-task weights show), unseen columns (masks show) and
r = K_old / K_new = 2/3 differs from 1 - r (DGR's weights show). Values the losses read inside the step (the
student's train-mode and eval-mode outputs, the teacher's, the replayed images, the
autoencoder's outputs) are read back from the same jitted call.
"""
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from abd_jax import data as data_lib
from abd_jax import methods, models, train
from abd_jax.methods import bic, coreset, dgr, e2e
from abd_jax.methods.teacher import FrozenModel
from abd_jax.synthesis import frozen_apply
from configs import digits
from helpers import TinyNet, ce64, log_softmax64

pytestmark = pytest.mark.xdist_group("baseline_losses")

NUM_CLASSES, NUM_TASKS, S = 8, 4, 2
K_OLD, K_NEW, B = 4, 6, 4
IMAGE = (8, 8, 1)
SPEC = data_lib.DatasetSpec("tiny", NUM_CLASSES, IMAGE, (0.5,), (0.25,))
TASK = methods.Task(index=2, num_tasks=NUM_TASKS, num_old=K_OLD, num_seen=K_NEW)
TOL = dict(rtol=2e-5, atol=2e-6)  # a float32 step against the float64 formula
T = 2.0
Y_MIXED = np.array([4, 5, 1, 3])  # a rehearsal batch: new images and memory samples
Y_NEW = np.array([4, 5, 5, 4])    # DGR's real batch: the new classes only
ALPHA, BETA = np.array([1.5, 0.75, 1.0, 1.0]), np.array([0.25, -0.5, 0.0, 0.0])


def _method(name, **subtree):
    config = digits.get_config()
    config.method, config.num_tasks = name, NUM_TASKS
    config.dgr.z_dim = 4
    for key, value in subtree.items():
        section, field = key.split(".")
        config[section][field] = value
    return methods.get_method(config, SPEC)


# ------------------------------------------------------------------ float64 numpy references
def _kd(s, t):
    """mean_i -sum_k softmax(t_i / T)_k log_softmax(s_i / T)_k."""
    return np.mean(-np.sum(np.exp(log_softmax64(np.asarray(t) / T))
                           * log_softmax64(np.asarray(s) / T), axis=-1))


def _task_kd(s, t, tasks):
    """The KD of each listed task over its own columns [j S, (j + 1) S)."""
    return [_kd(s[:, j * S:(j + 1) * S], t[:, j * S:(j + 1) * S]) for j in tasks]


def _correct(z, alpha, beta, upto):
    """BiC: columns [0, upto) of task j scaled by alpha_j and shifted by beta_j."""
    z = np.array(z, np.float64)
    for k in range(upto):
        z[:, k] = alpha[k // S] * z[:, k] + beta[k // S]
    return z


# ---------------------------------------------------------------------------- the one step
@pytest.fixture(scope="module")
def setup(session):
    net = TinyNet(NUM_CLASSES)
    x = jax.random.uniform(jax.random.PRNGKey(0), (B, *IMAGE))  # in [0, 1], as DGR's inputs
    student, teacher, before = jax.jit(lambda: tuple(
        net.init(jax.random.PRNGKey(k), x, train=False) for k in (1, 2, 3)))()
    # non-trivial running statistics, so that eval mode differs from train mode
    student = {**student, "batch_stats": jax.tree.map(lambda v: v + 0.3,
                                                      student["batch_stats"])}
    as_teacher = lambda v: FrozenModel(v["params"], v["batch_stats"])
    dgr_method = _method("dgr")
    vae = dgr_method.vae
    vae_params = {k: models.init_variables(session, vae, jax.random.PRNGKey(k),
                                           (1, *IMAGE))["params"] for k in (4, 5)}
    return dict(net=net, x=x, student=student, teacher=as_teacher(teacher),
                before=as_teacher(before), vae=vae, vae_params=vae_params,
                dgr_method=dgr_method, session=session)


def _ctx(s, inputs, labels, params=None, batch_stats="student"):
    """The step's context; `batch_stats`: the student's, or given (None: a frozen-backbone
    stage in eval mode, whose trained state carries no running statistics)."""
    params = s["student"]["params"] if params is None else params
    batch_stats = s["student"]["batch_stats"] if batch_stats == "student" else batch_stats

    def forward(images):
        (logits, feats), upd = s["net"].apply({"params": params, "batch_stats": batch_stats},
                                              images, train=True, mutable=["batch_stats"])
        return logits, feats, upd["batch_stats"]

    return train.LossContext(forward=forward, model=s["net"], params=params,
                             batch_stats=batch_stats, inputs=inputs,
                             images=s["x"], labels=jnp.asarray(labels), num_old=jnp.int32(K_OLD),
                             num_seen=jnp.int32(K_NEW), rng=jax.random.PRNGKey(7))


def _moved(s):
    """A head other than the student's: where the head-only stage may be part-way."""
    head = s["student"]["params"]["head"]
    return {"kernel": 1.5 * head["kernel"], "bias": head["bias"] + 0.25}


def _drop_bs(out):
    loss, _, metrics = out
    return loss, metrics


@pytest.fixture(scope="module")
def runs(setup):
    """Every method's loss on the step, in one jitted call, and the values they read."""
    s = setup
    student = FrozenModel(s["student"]["params"], s["student"]["batch_stats"])
    memory = jnp.full((8,), -1, jnp.int32)
    alpha, beta = jnp.asarray(ALPHA, jnp.float32), jnp.asarray(BETA, jnp.float32)
    distinct = jnp.zeros((NUM_TASKS,), jnp.int32)
    bic_state = bic.BiCState(teacher=s["teacher"], memory=memory, distinct=distinct,
                             alpha=alpha, beta=beta, correction=None)
    teacher_memory = coreset.TeacherMemoryState(teacher=s["teacher"], memory=memory,
                                                distinct=distinct)
    balanced = e2e.BalancedInputs(teacher=s["teacher"], before=s["before"])
    balanced_head = e2e.BalancedInputs(teacher=s["teacher"], before=student)
    stage2 = bic.CorrectionInputs(model=student, alpha=alpha, beta=beta,
                                  task_index=jnp.int32(TASK.index))
    vae_state = train.new_train_state(s["session"], s["vae"], {"params": s["vae_params"][4]},
                                      optax.identity())
    dgr_state = dgr.DGRState(teacher=s["teacher"], replay=s["vae_params"][4], vae=vae_state)
    autoencoder_inputs = dgr.AutoencoderInputs(previous=s["vae_params"][4])
    later = lambda name, **kw: _method(name, **kw).loss_fn(TASK)
    e2e_head, e2e_sum = _method("e2e"), _method("e2e", **{"e2e.kd_weighting": "sum"})
    e2e_all = _method("e2e", **{"e2e.balanced_trains": "all"})
    e2e_eval = _method("e2e", **{"e2e.balanced_bn": "eval"})
    e2e_before = _method("e2e", **{"e2e.new_class_kd": "before"})
    bic_method, m_dgr = _method("bic"), s["dgr_method"]

    @jax.jit
    def run(ab):
        apply = lambda teacher, x: frozen_apply(s["net"], teacher, x)
        mixed = lambda state: _ctx(s, state, Y_MIXED)
        # the head-only stage trains a head (here one moved away from the model's) on the
        # frozen model before the stage (here: the student)
        head_ctx = lambda inputs, **kw: _ctx(s, inputs, Y_MIXED, params=_moved(s), **kw)
        moved = {**s["student"]["params"], "head": _moved(s)}
        ctx_dgr = _ctx(s, dgr_state, Y_NEW)
        x_replay = dgr.decode_replay(s["vae"], s["vae_params"][4], ctx_dgr.rng, B, 0.0, 1.0)[0]
        x_vae = jnp.concatenate([s["x"], x_replay])  # DGR's inputs are [0, 1]: not normalised
        vae_out = s["vae"].apply({"params": s["vae_params"][5]}, x_vae,
                                 jax.random.fold_in(ctx_dgr.rng, 1))
        ae_ctx = lambda num_old: _ctx(s, autoencoder_inputs, Y_NEW, params=s["vae_params"][5],
                                      ).replace(num_old=jnp.int32(num_old))
        return dict(
            x=s["x"], head=_moved(s), z_train=mixed(None).forward(s["x"])[0],
            z_train_moved=s["net"].apply({"params": moved,
                                          "batch_stats": s["student"]["batch_stats"]},
                                         s["x"], train=True, mutable=["batch_stats"])[0][0],
            z_eval=apply(student, s["x"])[0], f_eval=apply(student, s["x"])[1],
            t=apply(s["teacher"], s["x"])[0], before=apply(s["before"], s["x"])[0],
            x_replay=x_replay, t_replay=apply(s["teacher"], x_replay)[0],
            z_dgr=ctx_dgr.forward(jnp.concatenate([s["x"], x_replay]))[0],
            vae=vae_out,
            base=_drop_bs(later("base")(mixed(None))),
            naive_rehearsal=_drop_bs(later("naive_rehearsal")(mixed(None))),
            lwf_coreset=_drop_bs(later("lwf_coreset")(mixed(teacher_memory))),
            e2e=_drop_bs(e2e_head.loss_fn(TASK)(mixed(teacher_memory))),
            e2e_sum=_drop_bs(e2e_sum.loss_fn(TASK)(mixed(teacher_memory))),
            e2e_balanced=_drop_bs(e2e_head.balanced_loss(head_ctx(balanced_head))),
            e2e_balanced_eval=_drop_bs(e2e_eval.balanced_loss(
                head_ctx(balanced_head, batch_stats=None))),
            e2e_balanced_before=_drop_bs(e2e_before.balanced_loss(
                head_ctx(balanced_head, batch_stats=None))),
            e2e_balanced_sum=_drop_bs(e2e_sum.balanced_loss(
                head_ctx(balanced_head, batch_stats=None))),
            e2e_balanced_all=_drop_bs(e2e_all.balanced_loss(mixed(balanced))),
            bic=_drop_bs(bic_method.loss_fn(TASK)(mixed(bic_state))),
            bic_stage2=_drop_bs(bic_method.correction_loss(_ctx(s, stage2, Y_MIXED, params=ab))),
            bic_stage2_eval=_drop_bs(bic_method.correction_loss(
                _ctx(s, stage2, Y_MIXED, params=ab, batch_stats=None))),
            dgr=_drop_bs(m_dgr.loss_fn(TASK)(ctx_dgr)),
            autoencoder=_drop_bs(m_dgr.autoencoder_loss(ae_ctx(K_OLD))),
            autoencoder_first=_drop_bs(m_dgr.autoencoder_loss(ae_ctx(0))))

    out = run({"alpha": jnp.float32(0.5), "beta": jnp.float32(1.25)})
    chex.assert_tree_all_finite(out)
    return jax.tree.map(lambda a: np.asarray(a, np.float64), out)


def _check(got, want):
    np.testing.assert_allclose(got, want, **TOL)


# ------------------------------------------------------------------------------- the tests
def test_base_and_naive_rehearsal_are_ce_over_the_seen_classes(runs):
    """Base; Naive Rehearsal is Base on the task's images + memory samples (docs/algorithm.md
    §6b)."""
    want = np.mean(ce64(runs["z_train"][:, :K_NEW], Y_MIXED))
    for name in ("base", "naive_rehearsal"):
        loss, metrics = runs[name]
        _check(loss, want)
        _check(metrics["ce"], want)


def test_lwf_coreset_is_ce_plus_kd_over_the_past_classes_on_every_row(runs):
    """LwF + coreset: CE over [0, K_new) + 1 * KD over [0, K_old) of all rows (T = 2)."""
    z, t = runs["z_train"], runs["t"]
    ce, kd = np.mean(ce64(z[:, :K_NEW], Y_MIXED)), _kd(z[:, :K_OLD], t[:, :K_OLD])
    loss, metrics = runs["lwf_coreset"]
    _check(metrics["ce"], ce)
    _check(metrics["kd"], kd)
    _check(loss, ce + kd)


def test_e2e_weights_each_past_task_by_its_share_of_the_old_classes(runs):
    """E2E (release): CE + sum_{j < t} KD_j * |task j| / K_old; the paper's "sum": weight 1.
    Only the past tasks' columns: the current task's KD would be a third term."""
    z, t = runs["z_train"], runs["t"]
    ce = np.mean(ce64(z[:, :K_NEW], Y_MIXED))
    kd0, kd1 = _task_kd(z, t, (0, 1))
    loss, metrics = runs["e2e"]
    _check(metrics["ce"], ce)
    _check(metrics["kd"], (kd0 + kd1) * S / K_OLD)
    _check(loss, ce + (kd0 + kd1) * S / K_OLD)
    loss, metrics = runs["e2e_sum"]
    _check(metrics["kd"], kd0 + kd1)
    _check(loss, ce + kd0 + kd1)


def test_e2e_balanced_stage_on_the_frozen_backbone(runs):
    """E2E's balanced fine-tuning: CE + w (KD_0 + KD_1 against the previous task's model) + w
    KD over the new classes [K_old, K_new), w = |task| / K_new. The head only: logits of the
    frozen model with the trained head (W, b), its BatchNorm in train mode (the release's
    `model.train()`, default) or on its running statistics (`balanced_bn=eval`: f W + b of
    the eval-mode features f). The new-class KD's target: the previous model's first
    |task| logits, as the release's `update_model_b` reads them (default), or the model
    before the stage (`new_class_kd=before`). "sum": w = 1."""
    head, t = runs["head"], runs["t"]
    z_eval = runs["f_eval"] @ head["kernel"] + head["bias"]
    w = S / K_NEW

    def want(z, target):
        ce = np.mean(ce64(z[:, :K_NEW], Y_MIXED))
        return ce, sum(_task_kd(z, t, (0, 1))), _kd(z[:, K_OLD:K_NEW], target)

    ce, kd_old, kd_new = want(runs["z_train_moved"], t[:, :K_NEW - K_OLD])  # the release
    loss, metrics = runs["e2e_balanced"]
    _check(metrics["ce"], ce)
    _check(metrics["kd"], w * kd_old)
    _check(metrics["kd_new_classes"], w * kd_new)
    _check(loss, ce + w * (kd_old + kd_new))
    ce, kd_old, kd_new = want(z_eval, t[:, :K_NEW - K_OLD])
    _check(runs["e2e_balanced_eval"][0], ce + w * (kd_old + kd_new))
    ce, kd_old, kd_new = want(z_eval, runs["z_eval"][:, K_OLD:K_NEW])  # the frozen model's
    _check(runs["e2e_balanced_before"][0], ce + w * (kd_old + kd_new))
    ce, kd_old, kd_new = want(z_eval, t[:, :K_NEW - K_OLD])
    _check(runs["e2e_balanced_sum"][0], ce + kd_old + kd_new)
    # balanced_trains="all": the whole network in train mode, against a separate "before"
    z = runs["z_train"]
    loss, _ = runs["e2e_balanced_all"]
    _check(loss, np.mean(ce64(z[:, :K_NEW], Y_MIXED)) + w * (
        sum(_task_kd(z, t, (0, 1))) + _kd(z[:, K_OLD:K_NEW], t[:, :K_NEW - K_OLD])))


def test_e2e_balanced_stage_trains_the_head_only(setup):
    """Head-only: the stage's parameters are the head's (the backbone is an input), and its
    gradient reaches both."""
    s = setup
    method = _method("e2e")
    student = FrozenModel(s["student"]["params"], s["student"]["batch_stats"])
    inputs = e2e.BalancedInputs(teacher=s["teacher"], before=student)
    grads = jax.jit(jax.grad(lambda head: method.balanced_loss(
        _ctx(s, inputs, Y_MIXED, params=head))[0]))(_moved(s))
    assert set(grads) == {"kernel", "bias"}
    assert np.abs(np.asarray(grads["kernel"])).sum() > 0
    assert np.abs(np.asarray(grads["bias"])).sum() > 0


def test_bic_stage1_mixes_ce_and_kd_by_the_old_class_share(runs):
    """BiC stage 1: (1 - l) CE + l KD over [0, K_old), l = K_old / K_new, student and teacher
    logits of the past tasks through their fixed corrections."""
    z = _correct(runs["z_train"], ALPHA, BETA, K_OLD)
    t = _correct(runs["t"], ALPHA, BETA, K_OLD)
    ce, kd = np.mean(ce64(z[:, :K_NEW], Y_MIXED)), _kd(z[:, :K_OLD], t[:, :K_OLD])
    lam = K_OLD / K_NEW
    loss, metrics = runs["bic"]
    _check(metrics["ce"], ce)
    _check(metrics["kd"], kd)
    _check(loss, (1 - lam) * ce + lam * kd)


def test_bic_stage2_fits_the_new_tasks_correction_on_the_frozen_model(runs):
    """Stage 2: CE over [0, K_new) of the frozen model's logits after every task's
    correction, the new task's (alpha, beta) = the trained parameters (0.5, 1.25); the model's
    BatchNorm in train mode (the release's `model.train()`, default) or eval mode
    (`stage2_bn=eval`)."""
    alpha, beta = ALPHA.copy(), BETA.copy()
    alpha[TASK.index], beta[TASK.index] = 0.5, 1.25
    for run, logits in (("bic_stage2", "z_train"), ("bic_stage2_eval", "z_eval")):
        z = _correct(runs[logits], alpha, beta, K_NEW)
        loss, metrics = runs[run]
        _check(loss, np.mean(ce64(z[:, :K_NEW], Y_MIXED)))
        _check(metrics["ce"], loss)


def test_bic_stage2_gradient_reaches_alpha_and_beta_only(setup):
    s = setup
    student = FrozenModel(s["student"]["params"], s["student"]["batch_stats"])
    inputs = bic.CorrectionInputs(model=student, alpha=jnp.asarray(ALPHA, jnp.float32),
                                  beta=jnp.asarray(BETA, jnp.float32),
                                  task_index=jnp.int32(TASK.index))
    method = _method("bic")
    grads = jax.jit(jax.grad(lambda ab: method.correction_loss(
        _ctx(s, inputs, Y_MIXED, params=ab))[0]))({"alpha": jnp.float32(1.0),
                                                   "beta": jnp.float32(0.0)})
    assert abs(float(grads["alpha"])) > 0 and abs(float(grads["beta"])) > 0


def test_bic_evaluation_logits(setup, runs):
    """The release evaluates the bare model; correct_at_test applies every task's correction,
    the current task's included."""
    z = runs["z_eval"].astype(np.float32)
    state = bic.BiCState(teacher=None, memory=None, distinct=None,
                         alpha=jnp.asarray(ALPHA, jnp.float32),
                         beta=jnp.asarray(BETA, jnp.float32), correction=None)
    rt = types.SimpleNamespace(session=setup["session"])
    scores = lambda method, task: method.eval_logits(rt, state, z, None, task)
    np.testing.assert_array_equal(scores(_method("bic"), TASK), z)
    correcting = _method("bic", **{"bic.correct_at_test": True})
    _check(scores(correcting, TASK), _correct(z, ALPHA, BETA, K_NEW))
    after_task_2 = methods.Task(index=1, num_tasks=NUM_TASKS, num_old=2, num_seen=4)
    _check(scores(correcting, after_task_2), _correct(z, ALPHA, BETA, 4))


def test_dgr_solver_loss(runs):
    """DGR (release): mean over real + replayed rows of w CE over [0, K_new), w = r = K_old /
    K_new for the replayed rows (labelled by the previous solver's argmax over the past
    classes), 1 - r for the real ones; + mu KD over [0, K_old) of the replayed rows."""
    z, t_replay = runs["z_dgr"], runs["t_replay"]
    y = np.concatenate([Y_NEW, np.argmax(t_replay[:, :K_OLD], axis=1)])
    r = K_OLD / K_NEW
    w = np.concatenate([np.full(B, 1 - r), np.full(B, r)])
    ce = np.mean(w * ce64(z[:, :K_NEW], y))
    kd = _kd(z[B:, :K_OLD], t_replay[:, :K_OLD])
    loss, metrics = runs["dgr"]
    _check(metrics["ce"], ce)
    _check(metrics["kd"], kd)
    _check(loss, ce + 1.0 * kd)


def test_dgr_autoencoder_loss(runs):
    """The autoencoder (release): mean_i w_i BCE_i + mean_i KL_i / pixels over the real and
    replayed images (w as the solver's), BCE and KL unweighted by anything else; in the first
    task (no replay) over the real images alone, w = 1."""
    recon, mean, logvar = runs["vae"]
    x = np.concatenate([runs["x"], runs["x_replay"]])
    pixels = np.prod(IMAGE)
    p = np.clip(recon.reshape(2 * B, -1), 1e-7, 1 - 1e-7)
    flat = x.reshape(2 * B, -1)
    bce = -np.mean(flat * np.log(p) + (1 - flat) * np.log(1 - p), axis=1)
    kl = -0.5 * np.sum(1 + logvar - mean ** 2 - np.exp(logvar), axis=1) / pixels
    r = K_OLD / K_NEW
    w = np.concatenate([np.full(B, 1 - r), np.full(B, r)])
    loss, metrics = runs["autoencoder"]
    _check(metrics["reconstruction"], np.mean(w * bce))
    _check(metrics["kl"], np.mean(kl))
    _check(loss, np.mean(w * bce) + np.mean(kl))
    loss, _ = runs["autoencoder_first"]
    _check(loss, np.mean(bce[:B]) + np.mean(kl[:B]))

