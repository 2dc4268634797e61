"""Model shapes and sizes against the reference architectures."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abd_jax import models


def _num_params(model, shape):
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))
    return sum(x.size for x in jax.tree.leaves(variables["params"]))


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


@pytest.mark.parametrize("size,channels", [(32, 3), (64, 3), (224, 3), (8, 1)])
def test_generator_presets(size, channels):
    gen = models.create_generator(size, channels, z_dim=16)
    out = jax.eval_shape(lambda: gen.init_with_output(jax.random.PRNGKey(0),
                                                       jnp.zeros((2, 16)))[0])
    assert out.shape == (2, size, size, channels)


def test_the_32x32_generator_has_the_releases_parameter_count():
    g = models.create_generator(32, 3, 1000)
    assert _num_params(g, (2, 1000)) == 8_423_939


def test_generator_and_head_are_initialised_as_pytorch_layers(session):
    """Generator Linear/Conv: PyTorch defaults U(+-1/sqrt(fan_in)) for weights and biases;
    classifier head: Kaiming-normal weights (SPEC section 2), PyTorch's default bias."""
    g = models.create_generator(32, 3, 1000)
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
