"""The im2col convolution (the CPU path) computes what XLA's convolution computes."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from abd_jax import conv, losses, models

NHWC = ("NHWC", "HWIO", "NHWC")


def _plain(x, k, strides, padding):
    return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=NHWC)


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((3, 8, 8, 4), (3, 3, 4, 5), (1, 1), ((1, 1), (1, 1))),
    ((3, 8, 8, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1))),
    ((2, 9, 7, 3), (1, 1, 3, 4), (2, 2), ((0, 0), (0, 0))),
    ((2, 16, 16, 3), (7, 7, 3, 4), (2, 2), ((3, 3), (3, 3))),
    ((2, 8, 8, 2), (3, 3, 2, 3), (1, 1), "SAME"),
    # 32x32 images: 4096-row chunks of 4 images, so the kernel gradient sums 3 chunks.
    ((12, 32, 32, 2), (3, 3, 2, 3), (1, 1), ((1, 1), (1, 1))),
])
def test_values_and_both_gradients_match_xla(shape, kernel, strides, padding):
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(len(shape) + kernel[0]), 3)
    x = jax.random.normal(kx, shape)
    k = jax.random.normal(kk, kernel)
    pads = lax.padtype_to_pads(shape[1:3], kernel[:2], strides, padding) \
        if isinstance(padding, str) else padding
    ref = _plain(x, k, strides, pads)
    out = conv.im2col_conv(x, k, strides, padding, dimension_numbers=NHWC)
    chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-5)
    g = jax.random.normal(kg, ref.shape)  # a random cotangent, not all-ones
    loss = lambda f: lambda x_, k_: jnp.sum(f(x_, k_) * g)
    want = jax.grad(loss(lambda a, b: _plain(a, b, strides, pads)), argnums=(0, 1))(x, k)
    got = jax.jit(jax.grad(loss(lambda a, b: conv.im2col_conv(a, b, strides, padding)),
                           argnums=(0, 1)))(x, k)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)


def test_chunking_divides_the_batch():
    assert conv._chunk_size(128, 1024) == 4
    assert conv._chunk_size(12, 1024) == 4
    assert conv._chunk_size(7, 1024) == 1      # no divisor of 7 fits but 1
    assert conv._chunk_size(6, 10) == 6        # small layers: one chunk


def test_bfloat16_inputs_give_a_bfloat16_kernel_gradient():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3)).astype(jnp.bfloat16)
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4)).astype(jnp.bfloat16)
    f = lambda k_: jnp.sum(conv.im2col_conv(x, k_, (1, 1), ((1, 1), (1, 1))).astype(
        jnp.float32))
    g = jax.grad(f)(k)
    g32 = jax.grad(lambda k_: jnp.sum(_plain(x.astype(jnp.float32), k_, (1, 1),
                                             ((1, 1), (1, 1)))))(k.astype(jnp.float32))
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), g32, rtol=2e-2, atol=2e-1)


def test_unsupported_settings_are_refused():
    x, k = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
    with pytest.raises(NotImplementedError, match="dilation"):
        conv.im2col_conv(x, k, (1, 1), "SAME", rhs_dilation=(2, 2))
    with pytest.raises(NotImplementedError, match="groups"):
        conv.im2col_conv(x, jnp.ones((3, 3, 1, 2)), (1, 1), "SAME", feature_group_count=2)


def test_backend_choice():
    assert conv.conv_for_backend("auto", "cpu") is conv.im2col_conv
    assert conv.conv_for_backend("auto", "gpu") is None  # XLA's (cuDNN), faster there
    assert conv.conv_for_backend("xla", "cpu") is None
    with pytest.raises(ValueError, match="conv_impl"):
        conv.conv_for_backend("fft")


@pytest.mark.slow
def test_classifier_gradients_do_not_depend_on_the_convolution(session):
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
    y = jnp.array([0, 1, 2, 3])
    grads = []
    for impl in ("xla", "im2col"):
        model = models.create_classifier("resnet8", 4, conv_impl=impl)
        v = models.init_variables(session, model, jax.random.PRNGKey(1), x[:1])

        def loss(p):
            (logits, _), _ = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x,
                                         train=True, mutable=["batch_stats"])
            return losses.weighted_ce_loss(logits, y)

        grads.append(jax.jit(jax.grad(loss))(v["params"]))
    chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
