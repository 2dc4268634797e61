"""DGR (docs/algorithm.md §6b): the release's autoencoder, its loss, replay labelled by the
previous classifier, the autoencoder's pass over the solver's own batches, memory, and resume
through the autoencoder stage."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abd_jax import generators, losses, methods, models, train
from abd_jax.methods import dgr
from configs import digits
from helpers import three_task_config


def _torch_param_count(c, side, z):
    """Parameters of the release's AutoEncoder(in_channel=c, img_sz=8 * side, z_size=z)."""
    conv = lambda i, o: i * o * 16 + o
    linear = lambda i, o: i * o + o
    volume = 512 * side * side
    return (conv(c, 64) + conv(64, 128) + conv(128, 512) + 2 * linear(volume, z)
            + linear(z, volume) + conv(512, 256) + conv(256, 64) + conv(64, c))


@pytest.mark.slow
@pytest.mark.parametrize("size,channels,z", [(32, 3, 1024), (8, 1, 32)])
def test_autoencoder_matches_the_release_and_outputs_images_in_0_1(size, channels, z, session):
    vae = generators.ConvVAE(image_size=size, channels=channels, z_dim=z)
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, size, size, channels))
    variables = models.init_variables(session, vae, jax.random.PRNGKey(1), x)
    assert models.parameter_count(variables["params"]) == _torch_param_count(channels,
                                                                             size // 8, z)
    recon, mean, logvar = jax.jit(vae.apply)(variables, x, jax.random.PRNGKey(3))
    assert recon.shape == x.shape and mean.shape == logvar.shape == (2, z)
    assert float(recon.min()) >= 0 and float(recon.max()) <= 1


def test_vae_loss_terms():
    x = jnp.full((2, 4, 4, 1), 0.25)
    zeros = jnp.zeros((2, 3))
    exact, recon, kl = losses.vae_loss(x, x, zeros, zeros)  # KL 0; BCE is x's entropy
    entropy = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    np.testing.assert_allclose(exact, entropy, rtol=1e-5)
    np.testing.assert_allclose(recon, entropy, rtol=1e-5)
    shifted = losses.vae_loss(x, x, jnp.ones((2, 3)), zeros)[0]  # KL = 0.5 * 3 per sample
    np.testing.assert_allclose(shifted - exact, 1.5 / 16, rtol=1e-5)
    # weights scale the reconstruction of each row (mean over rows), not the KL
    weighted = losses.vae_loss(x, x, jnp.ones((2, 3)), zeros, jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(weighted[1], entropy / 2, rtol=1e-5)
    np.testing.assert_allclose(weighted[2], 1.5 / 16, rtol=1e-5)
    # rows outside `rows` count for nothing, neither in the sums nor in the means
    worse = jnp.concatenate([x[:1], jnp.full((1, 4, 4, 1), 0.9)])
    masked = losses.vae_loss(worse, x, zeros, zeros, rows=jnp.array([1.0, 0.0]))[0]
    np.testing.assert_allclose(masked, exact, rtol=1e-5)


@pytest.mark.slow
def test_replay_is_labelled_by_the_previous_classifier_among_past_classes(session):
    config = digits.get_config()
    config.method = "dgr"
    method = methods.get_method(config)
    model = models.CifarResNet(depth=8, num_classes=6, width=4)
    learner = train.create_train_state(session, model, jax.random.PRNGKey(0), (8, 8, 1),
                                       train.learner_optimizer(session, 0.1, 0.9, 0.0))
    rt = methods.Runtime(config=config, plan=None, model=model, mesh=None,
                         image_shape=(8, 8, 1), steps_per_call=1,
                         method_key=np.array([0, 1], np.uint32), session=session)
    state = method.init_state(rt, learner)
    # A teacher whose head prefers class 1 among the past classes [0, 3), class 5 overall.
    head = dict(state.teacher.params["head"])
    head["bias"] = jnp.zeros(6).at[1].set(50.0).at[5].set(100.0)
    teacher = state.teacher.replace(params={**state.teacher.params, "head": head})
    state = state.replace(teacher=teacher)
    ctx = train.LossContext(forward=None, model=model, params=learner.params, batch_stats=None,
                            inputs=state, images=jnp.zeros((4, 8, 8, 1)),
                            labels=jnp.array([3, 4, 3, 4]), num_old=jnp.int32(3),
                            num_seen=jnp.int32(5), rng=jax.random.PRNGKey(2))
    x, y, replay_logits = dgr.replay_batch(ctx, method.vae, method.mean, method.std)
    assert x.shape == (8, 8, 8, 1) and replay_logits.shape == (4, 6)
    np.testing.assert_array_equal(y, [3, 4, 3, 4, 1, 1, 1, 1])
    assert float(x.min()) >= 0 and float(x.max()) <= 1  # the release's DGR: [0, 1] inputs


@pytest.mark.slow
def test_dgr_trains_its_autoencoder_on_each_tasks_batches_but_the_last(digits_data_dir,
                                                                         reference_run):
    config = three_task_config(digits_data_dir, "dgr")
    results, workdir = reference_run(config)
    memory = results["repeats"][0]["memory"]
    assert memory["generator_parameters"] == _torch_param_count(1, 1, config.dgr.z_dim)
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    vae = [line for line in lines if line.get("phase") == "autoencoder"]
    assert {line["task"] for line in vae} == {1, 2}
    first = [line["loss"] for line in vae if line["task"] == 1]
    assert first[-1] < first[0]  # the autoencoder learns
    # at the solver's learning rate, as many steps as the solver (the same batches)
    for task in (1, 2):
        solver = [line for line in lines if line.get("task") == task and "phase" not in line
                  and "lr" in line]
        steps = [line for line in vae if line["task"] == task]
        assert steps[-1]["step"] == solver[-1]["step"]
        assert [line["lr"] for line in steps] == [line["lr"] for line in solver]


@pytest.mark.slow
def test_the_autoencoder_pass_sees_the_solvers_batches(digits_data_dir, tmp_path, monkeypatch,
                                                       session):
    """The release updates the autoencoder in the solver's step; here a second pass over the
    task must draw the very same batches: its TaskInfo (examples, key, epochs, schedule) is
    the task's own."""
    from abd_jax import experiment, plan
    infos = []
    real = plan.RunPlan.task_info

    def record(self, *args, **kwargs):
        info = real(self, *args, **kwargs)
        infos.append(info)
        return info

    monkeypatch.setattr(plan.RunPlan, "task_info", record)
    config = three_task_config(digits_data_dir, "dgr")
    config.num_tasks, config.num_classes = 2, 4
    experiment.run(config, tmp_path, session=session)
    # task 1's training, its autoencoder pass, task 2's training (no pass after the last)
    assert len(infos) == 3
    for field in ("index", "count", "key", "steps_per_epoch", "total_steps", "base_lr",
                  "lr_milestones", "num_old", "num_seen"):
        np.testing.assert_array_equal(getattr(infos[0], field), getattr(infos[1], field))
