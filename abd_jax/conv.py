"""A 2-D convolution whose weight gradient is one im2col matrix product.

`im2col_conv` is a drop-in for `jax.lax.conv_general_dilated` (NHWC inputs, HWIO kernels, no
dilation, no groups), passed to `flax.linen.Conv(conv_general_dilated=...)`. Its forward and
input gradient are XLA's own convolutions; only the kernel gradient differs:

    dW[kh, kw, ci, co] = sum_{n, ho, wo} xpad[n, s*ho + kh, s*wo + kw, ci] * g[n, ho, wo, co]
                       = (P^T @ G) reshaped,  P = im2col(xpad) [N*Ho*Wo, KH*KW*Ci],
                                              G = g          [N*Ho*Wo, Co]

summed over chunks of the batch. XLA:CPU computes the kernel gradient of small-channel
convolutions (16-64 channels, the CIFAR ResNets) more slowly than these products;
`conv_for_backend()` picks this convolution on CPU.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _plain_conv(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


def im2col(x: jax.Array, kernel_hw: tuple[int, int], strides: tuple[int, int],
           padding: Sequence[tuple[int, int]]) -> jax.Array:
    """Patches `[N, Ho, Wo, KH*KW*C]` of NHWC `x`, ordered (kh, kw, c) like an HWIO kernel."""
    (kh, kw), (sh, sw) = kernel_hw, strides
    xpad = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    ho = (xpad.shape[1] - kh) // sh + 1
    wo = (xpad.shape[2] - kw) // sw + 1
    views = [xpad[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
             for i in range(kh) for j in range(kw)]
    return jnp.concatenate(views, axis=-1) if len(views) > 1 else views[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, padding):
    return _plain_conv(x, kernel, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
    return _plain_conv(x, kernel, strides, padding), (x, kernel)


def _chunk_size(batch: int, rows_per_image: int, target_rows: int = 4096) -> int:
    """The largest divisor of `batch` whose chunk has at most `target_rows` patch rows (>= 1)."""
    fits = [c for c in range(1, batch + 1) if batch % c == 0 and c * rows_per_image <= target_rows]
    return max(fits, default=1)


def kernel_grad(x, g, kernel_shape, strides, padding) -> jax.Array:
    """dW `[KH, KW, Ci, Co]` (float32) = im2col(x)^T @ g, accumulated over batch chunks.

    x `[N, H, W, Ci]`, g `[N, Ho, Wo, Co]`. The chunks keep each im2col block (~4k rows) in
    cache; building the whole `[N*Ho*Wo, KH*KW*Ci]` matrix at once is slower on CPU."""
    kh, kw, ci, co = kernel_shape
    n, ho, wo = g.shape[:3]

    def partial_grad(xc, gc):
        patches = im2col(xc, (kh, kw), strides, padding).reshape(-1, kh * kw * ci)
        return jnp.dot(patches.T, gc.reshape(-1, co), preferred_element_type=jnp.float32)

    chunk = _chunk_size(n, ho * wo)
    if chunk == n:
        dw = partial_grad(x, g)
    else:
        chunks = (x.reshape(n // chunk, chunk, *x.shape[1:]),
                  g.reshape(n // chunk, chunk, *g.shape[1:]))
        dw, _ = lax.scan(lambda acc, xg: (acc + partial_grad(*xg), None),
                         jnp.zeros((kh * kw * ci, co), jnp.float32), chunks)
    return dw.reshape(kernel_shape)


def _conv_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x_: _plain_conv(x_, kernel, strides, padding), x)
    (dx,) = input_vjp(g)
    dw = kernel_grad(x, g, kernel.shape, strides, padding)
    return dx, dw.astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def im2col_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count: int = 1,
                precision: Optional[lax.Precision] = None, **unused) -> jax.Array:
    """`lax.conv_general_dilated` for NHWC x HWIO with explicit padding, stride only."""
    del unused
    if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
        raise NotImplementedError("im2col_conv supports no dilation")
    if feature_group_count != 1:
        raise NotImplementedError("im2col_conv supports no feature groups")
    if dimension_numbers is not None:
        dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        if dn != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC):
            raise NotImplementedError(f"im2col_conv needs NHWC/HWIO, got {dimension_numbers}")
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    del precision  # XLA's default precision, as lax's convolution uses it
    return _conv(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))


CONV_IMPLS: dict[str, Optional[Callable]] = {"xla": None, "im2col": im2col_conv}


def conv_for_backend(name: str = "auto", backend: Optional[str] = None) -> Optional[Callable]:
    """The `conv_general_dilated` for flax's Conv: None (XLA's) or `im2col_conv`.

    "auto" is im2col on CPU (see the module docstring) and XLA's convolution elsewhere."""
    if name == "auto":
        name = "im2col" if (backend or jax.default_backend()) == "cpu" else "xla"
    if name not in CONV_IMPLS:
        raise ValueError(f"conv_impl {name!r}: use 'auto', 'xla' or 'im2col'")
    return CONV_IMPLS[name]
