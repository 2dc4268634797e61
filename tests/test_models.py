"""Model shapes and sizes against the reference architectures."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abd_jax import generators, models


def _num_params(model, shape):
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))
    return models.parameter_count(variables["params"])


def test_resnet18_matches_the_reference_parameter_count():
    # torchvision's resnet18 (1000 classes) has 11,689,512 parameters.
    assert _num_params(models.create_classifier("resnet18", 1000), (1, 224, 224, 3)) == 11_689_512


@pytest.mark.parametrize("depth,blocks", [(20, 3), (32, 5), (56, 9)])
def test_cifar_resnets_by_depth(depth, blocks):
    model = models.create_classifier(f"resnet{depth}", 100)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
    stage3 = [k for k in variables["params"] if k.startswith("stage3_block")]
    assert len(stage3) == blocks
    logits, features = jax.eval_shape(model.apply, variables, jnp.ones((2, 32, 32, 3)))
    assert logits.shape == (2, 100) and features.shape == (2, 64)
    # Option-A shortcuts have no parameters: no projection convs anywhere.
    assert not any("proj" in k for block in variables["params"].values()
                   if isinstance(block, dict) for k in block)


def test_resnet32_size():
    # He et al. (2016): ResNet-32 for CIFAR has 0.46M parameters.
    assert _num_params(models.create_classifier("resnet32", 10), (1, 32, 32, 3)) == 464_154


def test_bad_depth_names_the_valid_ones():
    with pytest.raises(ValueError, match="6n\\+2"):
        models.create_classifier("resnet33", 10)
    with pytest.raises(ValueError, match="6n\\+2"):
        models.create_classifier("resnet33_cl_lite", 10)
    with pytest.raises(ValueError, match="unknown model 'resnet32_cllite'.*resnet<6n\\+2>_cl_lite"):
        models.create_classifier("resnet32_cllite", 10)


def test_cl_lite_resnet32_has_cl_lites_parameter_count():
    """cl-lite's resnet32 with R-DFCIL's 10 bias-free task heads of 10 classes:
    stem 3*3*3*16 + 2*16 = 464; stage 1: 5 x (2 * 9*16*16 + 2 * 2*16) = 23,360;
    stage 2: (9*16*32 + 9*32*32 + 2 * 2*32) + 4 x (2 * 9*32*32 + 2 * 2*32) = 88,192;
    stage 3 (with cl-lite's `stage_4` block): (9*32*64 + 9*64*64 + 2 * 2*64)
    + 4 x (2 * 9*64*64 + 2 * 2*64) = 351,488; heads 10 x 64*10 = 6,400. That is 469,904,
    cl-lite's count for the same network (BatchNorm running statistics are buffers there,
    batch_stats here: neither counts)."""
    model = models.create_classifier("resnet32_cl_lite", 100, head_bias=False)
    assert _num_params(model, (1, 32, 32, 3)) == 464 + 23_360 + 88_192 + 351_488 + 6_400
    assert _num_params(model, (1, 32, 32, 3)) == 469_904


def _conv64(x, kernel, stride):
    """float64 3x3 convolution with zero padding 1 (PyTorch's); x `[B, H, W, C]`, kernel
    `[3, 3, C, F]`."""
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    size = (x.shape[1] - 3) // stride + 1
    end = lambda i: i + stride * (size - 1) + 1
    return sum(np.einsum("bhwc,cf->bhwf", x[:, i:end(i):stride, j:end(j):stride], kernel[i, j])
               for i in range(3) for j in range(3))


def _cl_lite_resnet8_reference(params, stats, x):
    """cl-lite's `CifarResNet.forward` in eval mode, in float64 numpy, for depth 8 (one block
    per stage): conv-BN-ReLU stem; per block conv_a-bn_a-ReLU-conv_b-bn_b, plus the shortcut
    (at stride 2: `x[..., ::2, ::2]` then `cat((x, 0 * x))`), no ReLU after the addition;
    average pooling; bias-free linear head. Returns (logits, features)."""
    p = lambda tree: {k: np.asarray(v, np.float64) for k, v in tree.items()}

    def bn(y, name, block=None):
        g, s = (params, stats) if block is None else (params[block], stats[block])
        g, s = p(g[name]), p(s[name])
        return (y - s["mean"]) / np.sqrt(s["var"] + 1e-5) * g["scale"] + g["bias"]

    x = np.asarray(x, np.float64)
    x = np.maximum(bn(_conv64(x, p(params["stem_conv"])["kernel"], 1), "stem_bn"), 0)
    for stage, stride in ((1, 1), (2, 2), (3, 2)):
        block = f"stage{stage}_block0"
        w = lambda name: p(params[block][name])["kernel"]
        y = np.maximum(bn(_conv64(x, w("conv1"), stride), "bn1", block), 0)
        y = bn(_conv64(y, w("conv2"), 1), "bn2", block)
        if stride == 2:
            x = np.concatenate([x[:, ::2, ::2], 0 * x[:, ::2, ::2]], axis=-1)
        x = x + y
    features = x.mean(axis=(1, 2))
    return features @ p(params["head"])["kernel"], features


def test_cl_lite_resnet_forward_matches_a_numpy_reference():
    """resnet8_cl_lite on every parameter and running statistic drawn at random (gamma far
    from 0): eval-mode logits and features equal cl-lite's forward written in numpy. The
    features take negative values, which a ReLU after the last addition would rule out."""
    model = models.create_classifier("resnet8_cl_lite", 5, head_bias=False)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(1)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "var" in name:
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        scale = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if "kernel" in name else 0.5
        return (scale * rng.normal(size=leaf.shape)).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(draw, variables)
    logits, features = jax.jit(model.apply)(variables, x)
    want_logits, want_features = _cl_lite_resnet8_reference(variables["params"],
                                                            variables["batch_stats"], x)
    np.testing.assert_allclose(np.asarray(features), want_features, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-4, atol=1e-5)
    assert (np.asarray(features) < 0).any()


@pytest.mark.slow
def test_cl_lite_resnet_initialisation():
    """Each block's last BN starts at gamma 0 (the others at 1, betas 0), so at initialisation
    every block passes its shortcut: the features are the stem's eval-mode output subsampled
    twice (`::4`), pooled, with zeros in the 48 channels appended after. Convolutions are
    Kaiming-normal in fan-out mode, N(0, 2 / (9 C_out)) (resnet8: fan-in, N(0, 2 / (9 C_in)))."""
    model = models.create_classifier("resnet8_cl_lite", 10)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    params = variables["params"]
    for stage in (1, 2, 3):
        block = params[f"stage{stage}_block0"]
        np.testing.assert_array_equal(block["bn2"]["scale"], 0.0)
        np.testing.assert_array_equal(block["bn1"]["scale"], 1.0)
        for bn in ("bn1", "bn2"):
            np.testing.assert_array_equal(block[bn]["bias"], 0.0)
    np.testing.assert_array_equal(params["stem_bn"]["scale"], 1.0)
    _, features = jax.jit(model.apply)(variables, x)
    stem = np.maximum(_conv64(x.astype(np.float64), np.asarray(params["stem_conv"]["kernel"],
                                                                np.float64), 1), 0)
    stem = stem / np.sqrt(1 + 1e-5)  # running mean 0, variance 1, gamma 1, beta 0
    np.testing.assert_allclose(np.asarray(features)[:, :16], stem[:, ::4, ::4].mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(features)[:, 16:], 0.0)
    fan_in_params = jax.jit(models.create_classifier("resnet8", 10).init)(
        jax.random.PRNGKey(0), x)["params"]
    for name, c_in, c_out in (("stem_conv", 3, 16), ("stage3_block0", 32, 64)):
        kernel = lambda p: np.asarray(p[name]["kernel"] if name == "stem_conv"
                                      else p[name]["conv1"]["kernel"])
        np.testing.assert_allclose(kernel(params).std(), np.sqrt(2 / (9 * c_out)), rtol=0.1)
        np.testing.assert_allclose(kernel(fan_in_params).std(), np.sqrt(2 / (9 * c_in)),
                                   rtol=0.1)


@pytest.mark.parametrize("size,channels", [(32, 3), (64, 3), (224, 3), (8, 1)])
def test_generator_presets(size, channels):
    gen = generators.create_generator(size, channels, z_dim=16)
    out = jax.eval_shape(lambda: gen.init_with_output(jax.random.PRNGKey(0),
                                                       jnp.zeros((2, 16)))[0])
    assert out.shape == (2, size, size, channels)


def test_the_32x32_generator_has_the_releases_parameter_count():
    g = generators.create_generator(32, 3, 1000)
    assert _num_params(g, (2, 1000)) == 8_423_939


@pytest.mark.slow
def test_generator_and_head_are_initialised_as_pytorch_layers(session):
    """Generator Linear/Conv: PyTorch defaults U(+-1/sqrt(fan_in)) for weights and biases;
    classifier head: Kaiming-normal weights (docs/algorithm.md §2), PyTorch's default bias."""
    g = generators.create_generator(32, 3, 1000)
    params = models.init_variables(session, g, jax.random.PRNGKey(0), (2, 1000),
                                   train=False)["params"]
    for name, fan_in in (("fc", 1000), ("conv1", 9 * 128), ("conv2", 9 * 128),
                         ("conv_out", 9 * 64)):
        bound = 1 / np.sqrt(fan_in)
        for leaf in ("kernel", "bias"):
            values = np.asarray(params[name][leaf]).ravel()
            assert np.abs(values).max() <= bound, (name, leaf)
            # uniform on [-b, b]: standard deviation b / sqrt(3)
            np.testing.assert_allclose(values.std(), bound / np.sqrt(3), rtol=0.15 if
                                       values.size > 100 else 0.6, err_msg=f"{name} {leaf}")
    head = models.init_variables(session, models.create_classifier("resnet32", 100),
                                 jax.random.PRNGKey(1), (1, 32, 32, 3))["params"]["head"]
    assert np.abs(np.asarray(head["bias"])).max() <= 1 / 8 and np.asarray(head["bias"]).std() > 0
    np.testing.assert_allclose(np.asarray(head["kernel"]).std(), np.sqrt(2 / 64), rtol=0.1)


def test_resnet18_cifar_has_the_official_parameter_count():
    """PyCIL's `resnet18` for CIFAR (FeCAM's, ADC's `convs/resnet.py`), by hand: stem
    9*3*64 + 2*64 = 1,856; stage 1: 2 x (2 * 9*64*64 + 2 * 2*64) = 147,968; stage 2:
    (9*64*128 + 9*128*128 + 64*128 + 3 * 2*128) + (2 * 9*128*128 + 2 * 2*128) = 525,568;
    stage 3: (9*128*256 + 9*256*256 + 128*256 + 3 * 2*256) + (2 * 9*256*256 + 2 * 2*256)
    = 2,099,712; stage 4: (9*256*512 + 9*512*512 + 256*512 + 3 * 2*512)
    + (2 * 9*512*512 + 2 * 2*512) = 8,393,728. That is 11,168,832, the official backbone's
    count (torchvision's 11,176,512 less the 7x7 stem's 7,680 extra weights; BN running
    statistics are buffers there, batch_stats here). Heads: Linear 512*100 + 100, the official
    `CosineLinear` 512*100 + 1 (one sigma)."""
    backbone = 1_856 + 147_968 + 525_568 + 2_099_712 + 8_393_728
    assert backbone == 11_168_832
    shape = (1, 32, 32, 3)
    assert _num_params(models.create_classifier("resnet18_cifar", 100), shape) == (
        backbone + 512 * 100 + 100)
    assert _num_params(models.create_classifier("resnet18_cifar", 100, head="cosine"),
                       shape) == backbone + 512 * 100 + 1


def _block_outputs(name: str, shape: tuple) -> dict:
    """Output shapes of the stem conv and every block of `name` on inputs `shape`, with the
    (logits, features) shapes under "out"."""
    model = models.create_classifier(name, 100)
    x = jnp.zeros(shape)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    out, state = jax.eval_shape(lambda v, x: model.apply(v, x, capture_intermediates=True,
                                                         mutable=["intermediates"]), variables, x)
    shapes = {k: v["__call__"][0].shape for k, v in state["intermediates"].items()
              if k != "__call__" and "__call__" in v}
    return {**shapes, "out": tuple(o.shape for o in out)}


def test_resnet18_cifar_stem_keeps_the_resolution():
    """A 3x3 stride-1 stem and no max-pool: an 8x8 input is 8x8 into stage 1 (the ImageNet
    stem's 7x7/2 conv and 3x3/2 max-pool make it 2x2); 32x32 CIFAR images end at 4x4 x 512."""
    cifar = _block_outputs("resnet18_cifar", (2, 8, 8, 3))
    assert cifar["stem_conv"] == cifar["stage1_block1"] == (2, 8, 8, 64)
    assert _block_outputs("resnet18", (2, 8, 8, 3))["stage1_block1"] == (2, 2, 2, 64)
    shapes = _block_outputs("resnet18_cifar", (2, 32, 32, 3))
    assert [shapes[f"stage{s}_block1"] for s in (1, 2, 3, 4)] == [
        (2, 32, 32, 64), (2, 16, 16, 128), (2, 8, 8, 256), (2, 4, 4, 512)]
    assert shapes["out"] == ((2, 100), (2, 512))


@pytest.mark.slow
def test_resnet18_cifar_and_cosine_head_initialisation(session):
    """As the official code: every convolution Kaiming-normal in fan-out mode,
    N(0, 2 / (k*k*C_out)), projections included; every BN at gamma 1, beta 0 (the last BN
    of a block too); the cosine head's kernel U(+-1/sqrt(512)) and sigma 1."""
    model = models.create_classifier("resnet18_cifar", 100, head="cosine")
    params = models.init_variables(session, model, jax.random.PRNGKey(0), (1, 8, 8, 3),
                                   train=False)["params"]
    block = params["stage4_block0"]
    for kernel, fan_out in ((params["stem_conv"]["kernel"], 9 * 64),
                            (block["conv1"]["kernel"], 9 * 512),
                            (block["proj_conv"]["kernel"], 512)):
        np.testing.assert_allclose(np.asarray(kernel).std(), np.sqrt(2 / fan_out), rtol=0.05)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path)
        if "bn" in name:
            np.testing.assert_array_equal(leaf, 1.0 if "scale" in name else 0.0, err_msg=name)
    kernel, bound = np.asarray(params["head"]["kernel"]), 1 / np.sqrt(512)
    assert np.abs(kernel).max() <= bound
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.05)
    assert params["head"]["sigma"] == 1.0


def _cosine_numpy(features, kernel, sigma):
    """sigma * <x / max(|x|, 1e-12), w_k / max(|w_k|, 1e-12)> in float64 (`F.normalize`)."""
    unit = lambda v, axis: v / np.maximum(np.linalg.norm(v, axis=axis, keepdims=True), 1e-12)
    features, kernel = np.asarray(features, np.float64), np.asarray(kernel, np.float64)
    return sigma * unit(features, -1) @ unit(kernel, 0)


def test_cosine_head_logits_match_numpy():
    """resnet8 with the cosine head on fixed head weights (one all-zero class column, scale
    2.5): logits = sigma * cos(features, w_k), the zero column's logit 0."""
    model = models.create_classifier("resnet8", 5, head="cosine")
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    assert set(variables["params"]["head"]) == {"kernel", "sigma"}
    kernel = np.random.default_rng(1).normal(size=(64, 5)).astype(np.float32)
    kernel[:, 4] = 0.0
    params = {**variables["params"], "head": {"kernel": kernel, "sigma": np.float32(2.5)}}
    logits, features = jax.jit(model.apply)({**variables, "params": params}, x)
    want = _cosine_numpy(features, kernel, 2.5)
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(logits)[:, 4], 0.0)


def test_cosine_head_scale_gets_a_gradient():
    """d/dsigma sum(r * logits) = sum(r * cos) and the kernel's gradient are finite and
    non-zero, an all-zero feature row included (its logits 0, no NaN)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    x[3] = 0.0
    kernel = rng.normal(size=(6, 3)).astype(np.float32)
    r = rng.normal(size=(4, 3)).astype(np.float32)
    head = models.CosineLinear(3)
    loss = lambda p: jnp.sum(r * head.apply({"params": p}, x))
    grads = jax.grad(loss)({"kernel": kernel, "sigma": jnp.float32(1.5)})
    np.testing.assert_allclose(grads["sigma"], np.sum(r * _cosine_numpy(x, kernel, 1.0)),
                               rtol=1e-5)
    assert np.all(np.isfinite(grads["kernel"])) and np.abs(grads["kernel"]).max() > 0


def test_unknown_head_names_the_choices():
    with pytest.raises(ValueError, match="unknown head 'arcface': use one of linear, cosine"):
        models.create_classifier("resnet32", 10, head="arcface")


def test_method_classifier_reads_the_run_wide_head():
    """`Method.classifier` builds `--config.head` ("linear" when the config has none)."""
    import ml_collections

    from abd_jax.methods.lifecycle import Method

    config = ml_collections.ConfigDict(dict(model="resnet8", dtype="float32", conv_impl="xla"))
    assert Method(config, None).classifier(10).head == "linear"
    config.head = "cosine"
    assert Method(config, None).classifier(10) == models.create_classifier(
        "resnet8", 10, conv_impl="xla", head="cosine")


@pytest.mark.parametrize("name,shape", [("resnet8", (2, 8, 8, 3)),
                                        ("resnet8_cl_lite", (2, 8, 8, 3)),
                                        ("resnet18", (1, 32, 32, 3))])
def test_existing_models_build_unchanged_with_the_default_head(name, shape):
    """The default head is today's Dense "head" (kernel and bias): the default build equals
    head="linear" field by field, and the CIFAR nets' variables and outputs bit by bit
    (the ImageNet ResNet-18 by shapes; its count is checked above)."""
    default = models.create_classifier(name, 10)
    linear = models.create_classifier(name, 10, head="linear")
    assert default == linear
    variables = jax.eval_shape(default.init, jax.random.PRNGKey(0), jnp.zeros(shape))
    assert {k: v.shape for k, v in variables["params"]["head"].items()} == {
        "kernel": (512 if name == "resnet18" else 64, 10), "bias": (10,)}
    if name != "resnet18":
        x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        run = lambda m: jax.jit(lambda x: (lambda v: (v, m.apply(v, x)))(
            m.init(jax.random.PRNGKey(0), x)))(x)
        for a, b in zip(jax.tree.leaves(run(default)), jax.tree.leaves(run(linear))):
            np.testing.assert_array_equal(a, b)
