"""Flax linen models: CIFAR ResNets (6n+2, and cl-lite's variant), ResNet-18 (ImageNet stem,
and the CIFAR stem of the exemplar-free methods), their BatchNorm and heads.

Every classifier maps images `[B, H, W, C]` (normalised float) to `(logits [B, num_classes],
features [B, D])`, `features` being the penultimate (globally pooled) activations.

BatchNorm running statistics live in the `batch_stats` collection. When the caller makes the
`bn_inputs` collection mutable, every BatchNorm layer also sows the mean and biased variance
over (N, H, W) of its *input* for the current batch under the same module path, which is what
the stat-alignment loss of model inversion compares with `batch_stats` (docs/algorithm.md §3).
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from abd_jax import conv as conv_lib

BN_INPUTS = "bn_inputs"

# PyTorch kaiming_normal_(mode="fan_in", nonlinearity="relu"): N(0, 2 / fan_in), untruncated.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# kaiming_normal_(mode="fan_out", nonlinearity="relu"): N(0, 2 / fan_out), fan_out = k * k * out.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default Linear/Conv weight init, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int):
    """PyTorch's default Linear/Conv bias init: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def parameter_count(params) -> int:
    """The number of parameters in `params`: a tree of arrays, or of their shapes (e.g. from
    `jax.eval_shape`)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def init_variables(session, module: nn.Module, rng, *inputs, **kwargs) -> dict:
    """`module.init(rng, *inputs, **kwargs)` as one compiled program (`kwargs` static), made
    once per `session` for equal modules. An input given as a shape tuple is a float32 array
    of zeros made inside the program (nothing crosses from the host).

    Run eagerly, init compiles every initialiser and layer op on its own (hundreds of small
    XLA compilations). XLA:CPU also spends long optimising the random-number code, which runs
    once: on CPU it is compiled without LLVM optimisation (values equal up to float rounding,
    the optimised code fusing multiply-adds)."""
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
    shapes = tuple(tuple(x) if isinstance(x, tuple) else None for x in inputs)
    arrays = [x for x in inputs if not isinstance(x, tuple)]
    return session.jitted(_init_fn, module, shapes, tuple(sorted(kwargs.items())),
                          compiler_options=options)(jax.device_put(rng), *arrays)


def _init_fn(module: nn.Module, shapes: tuple, kwargs: tuple):
    def init(key, *arrays):
        given = iter(arrays)
        inputs = [next(given) if shape is None else jnp.zeros(shape, jnp.float32)
                  for shape in shapes]
        return module.init(key, *inputs, **dict(kwargs))

    return init


class BatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` (PyTorch defaults: eps 1e-5, momentum 0.1 == Flax 0.9) that can sow the
    batch mean/variance of its input into the `bn_inputs` collection."""

    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, use_running_average=None, **kwargs):
        if self.is_mutable_collection(BN_INPUTS):
            axes = tuple(range(x.ndim - 1))
            x32 = x.astype(jnp.float32)
            mean = jnp.mean(x32, axis=axes)
            var = jnp.mean(jnp.square(x32), axis=axes) - jnp.square(mean)
            self.sow(BN_INPUTS, "input_stats", (mean, jnp.maximum(var, 0.0)))
        return super().__call__(x, use_running_average=use_running_average, **kwargs)


class BasicBlock(nn.Module):
    """Residual basic block (two 3x3 convs), ReLU(y + shortcut) (no ReLU without
    `relu_after_add`). When the shape changes the shortcut is "A" (CIFAR ResNets: stride-2
    subsampling plus zero channels on both sides), "A_after" (the zero channels after the
    input's, as cl-lite) or "B" (ResNet-18: 1x1 conv + BN projection). `zero_residual`:
    the last BN starts at gamma 0 (the block starts as its shortcut)."""

    filters: int
    strides: int
    norm: Callable[..., Any]
    shortcut: str = "A"
    relu_after_add: bool = True
    zero_residual: bool = False
    conv_init: Callable = kaiming_normal
    dtype: Any = jnp.float32
    conv_fn: Optional[Callable] = None  # see CifarResNet

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, s, name: nn.Conv(f, (k, k), (s, s), padding=k // 2, use_bias=False,
                                             kernel_init=self.conv_init, dtype=self.dtype,
                                             conv_general_dilated=self.conv_fn, name=name)
        y = nn.relu(self.norm(name="bn1")(conv(self.filters, 3, self.strides, "conv1")(x)))
        gamma = nn.initializers.zeros if self.zero_residual else nn.initializers.ones
        y = self.norm(name="bn2", scale_init=gamma)(conv(self.filters, 3, 1, "conv2")(y))
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.filters:
            if self.shortcut in ("A", "A_after"):
                extra = self.filters - x.shape[-1]
                before = 0 if self.shortcut == "A_after" else extra // 2
                shortcut = jnp.pad(x[:, ::self.strides, ::self.strides, :],
                                   ((0, 0), (0, 0), (0, 0), (before, extra - before)))
            else:
                shortcut = self.norm(name="proj_bn")(
                    conv(self.filters, 1, self.strides, "proj_conv")(x))
        y = y + shortcut
        return nn.relu(y) if self.relu_after_add else y


HEADS = ("linear", "cosine")  # a classifier's `head`


def check_head(head: str) -> None:
    """Raise ValueError naming the choices unless `head` is one of `HEADS`."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}: use one of {', '.join(HEADS)} "
                         "(--config.head)")


class CosineLinear(nn.Module):
    """Cosine classifier with a learnable scale (PyCIL's and FeCAM's `CosineLinear`, sigma on):
    features `[B, D]` -> logits `[B, K]` = sigma * <x / |x|, w_k / |w_k|>, with |v| floored at
    1e-12 as `F.normalize`. Params: "kernel" `[D, K]`, U(+-1/sqrt(D)) as the official init, and
    one scalar "sigma" for the whole head, initialised to 1 (the official `SplitCosineLinear`
    of later tasks shares it too). No bias."""

    num_classes: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", torch_default_kernel, (x.shape[-1], self.num_classes))
        sigma = self.param("sigma", nn.initializers.ones, ())
        unit = lambda v, axis: v * jax.lax.rsqrt(
            jnp.maximum(jnp.sum(jnp.square(v), axis=axis, keepdims=True), 1e-24))
        return sigma * (unit(x, -1) @ unit(kernel, 0))


def _pool_and_classify(x, num_classes: int, head_bias: bool, head: str):
    """(logits `[B, num_classes]`, features `[B, D]`) of the last feature map `[B, H, W, D]`:
    global average pooling, then the head "head": "linear" (Dense: Kaiming-normal kernel,
    PyTorch's default bias unless `head_bias` is False) or "cosine" (`CosineLinear`). Called
    inside the network's compact `__call__`."""
    features = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
    check_head(head)
    if head == "cosine":
        return CosineLinear(num_classes, name="head")(features), features
    logits = nn.Dense(num_classes, use_bias=head_bias, kernel_init=kaiming_normal,
                      bias_init=torch_default_bias(features.shape[-1]), name="head")(features)
    return logits, features


class CifarResNet(nn.Module):
    """ResNet of depth 6n+2 for 32x32 inputs (He et al. 2016): a 3x3 conv-BN-ReLU stem, then
    3 stages of n blocks, `width`, 2*width, 4*width channels; 64-d features for width 16.

    conv_fn: the `lax.conv_general_dilated` every Conv uses (None: XLA's; see `abd_jax.conv`).
    relu_after_add, zero_residual, shortcut: every block's (`BasicBlock`); conv_init: every
    convolution's kernel init; head: "linear" or "cosine" (`_pool_and_classify`); head_bias:
    whether a linear head has a bias.
    """

    depth: int = 32
    num_classes: int = 100
    width: int = 16
    dtype: Any = jnp.float32
    conv_fn: Optional[Callable] = None
    relu_after_add: bool = True
    zero_residual: bool = False
    conv_init: Callable = kaiming_normal
    shortcut: str = "A"
    head_bias: bool = True
    head: str = "linear"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if (self.depth - 2) % 6 or self.depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 44, 56, ...), "
                             f"got {self.depth}")
        n = (self.depth - 2) // 6
        norm = lambda name, **kw: BatchNorm(use_running_average=not train, dtype=self.dtype,
                                            name=name, **kw)
        x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, kernel_init=self.conv_init,
                    dtype=self.dtype, conv_general_dilated=self.conv_fn,
                    name="stem_conv")(x.astype(self.dtype))
        x = nn.relu(norm("stem_bn")(x))
        for stage in range(3):
            for block in range(n):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(self.width * 2**stage, strides, norm=norm, shortcut=self.shortcut,
                               relu_after_add=self.relu_after_add,
                               zero_residual=self.zero_residual, conv_init=self.conv_init,
                               dtype=self.dtype, conv_fn=self.conv_fn,
                               name=f"stage{stage + 1}_block{block}")(x)
        return _pool_and_classify(x, self.num_classes, self.head_bias, self.head)


# cl-lite's `resnet_cifar.CifarResNet` (R-DFCIL's CIFAR backbone): no ReLU after any block's
# addition (the pooled features are pre-activation), each block's last BN at gamma 0, every
# convolution Kaiming-normal in fan-out mode, the shortcut's zero channels after the input's.
CifarResNetClLite = functools.partial(CifarResNet, relu_after_add=False, zero_residual=True,
                                      conv_init=kaiming_normal_fan_out, shortcut="A_after")


class ResNet18(nn.Module):
    """ResNet-18: a conv-BN-ReLU stem, 4 stages of 2 basic blocks (64..512 channels, stride 2
    from stage 2, 1x1 conv + BN projections where the shape changes), 512-d features.

    stem: "imagenet" (7x7/2 conv, then a 3x3/2 max-pool) or "cifar" (3x3/1 conv, no pooling:
    `ResNet18Cifar`). conv_init: every convolution's kernel init. conv_fn, head, head_bias: as
    `CifarResNet`'s.
    """

    num_classes: int = 1000
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    dtype: Any = jnp.float32
    conv_fn: Optional[Callable] = None  # see CifarResNet
    head_bias: bool = True
    stem: str = "imagenet"
    conv_init: Callable = kaiming_normal
    head: str = "linear"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"ResNet18 stem {self.stem!r}: use 'imagenet' or 'cifar'")
        imagenet = self.stem == "imagenet"
        norm = lambda name, **kw: BatchNorm(use_running_average=not train, dtype=self.dtype,
                                            name=name, **kw)
        size, stride = (7, 2) if imagenet else (3, 1)
        x = nn.Conv(64, (size, size), (stride, stride), padding=size // 2, use_bias=False,
                    kernel_init=self.conv_init, dtype=self.dtype,
                    conv_general_dilated=self.conv_fn, name="stem_conv")(x.astype(self.dtype))
        x = nn.relu(norm("stem_bn")(x))
        if imagenet:
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for stage, blocks in enumerate(self.stage_sizes):
            for block in range(blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(64 * 2**stage, strides, norm=norm, shortcut="B",
                               conv_init=self.conv_init, dtype=self.dtype, conv_fn=self.conv_fn,
                               name=f"stage{stage + 1}_block{block}")(x)
        return _pool_and_classify(x, self.num_classes, self.head_bias, self.head)


# The CIFAR ResNet-18 of the exemplar-free methods (PyCIL's `convs/resnet.py` `resnet18` for a
# "cifar" dataset, copied unchanged by FeCAM and ADC): 3x3/1 stem without max-pool, every
# convolution Kaiming-normal in fan-out mode, every BN at gamma 1, beta 0 (no zero-init of
# the last BN: `zero_init_residual` stays False), PyTorch's BN defaults.
ResNet18Cifar = functools.partial(ResNet18, stem="cifar", conv_init=kaiming_normal_fan_out)


def create_classifier(name: str, num_classes: int, dtype: str = "float32",
                      conv_impl: str = "auto", head_bias: bool = True,
                      head: str = "linear") -> nn.Module:
    """`name`: "resnet18" (ImageNet), "resnet18_cifar" (`ResNet18Cifar`: FeCAM's, ADC's),
    "resnet<6n+2>" (CIFAR family, e.g. resnet32) or "resnet<6n+2>_cl_lite"
    (`CifarResNetClLite`, e.g. resnet32_cl_lite: R-DFCIL's).

    conv_impl: "xla", "im2col" or "auto" (im2col on CPU), see `abd_jax.conv.conv_for_backend`.
    head: "linear" (Dense) or "cosine" (`CosineLinear`); head_bias: whether a linear head has
    a bias (a cosine head has none).
    """
    check_head(head)
    kwargs = dict(num_classes=num_classes, dtype=jnp.dtype(dtype),
                  conv_fn=conv_lib.conv_for_backend(conv_impl), head_bias=head_bias, head=head)
    if name == "resnet18":
        return ResNet18(**kwargs)
    if name == "resnet18_cifar":
        return ResNet18Cifar(**kwargs)
    cifar = re.fullmatch(r"resnet(\d+)(_cl_lite)?", name)
    if cifar:
        depth = int(cifar.group(1))
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 44, 56, ...), "
                             f"got {name!r}")
        return (CifarResNetClLite if cifar.group(2) else CifarResNet)(depth=depth, **kwargs)
    raise ValueError(f"unknown model {name!r}: use 'resnet18' (ImageNet), 'resnet18_cifar' "
                     "(ResNet-18 with a CIFAR stem), 'resnet<6n+2>' (CIFAR: resnet8, resnet14, "
                     "resnet20, resnet32, resnet44, resnet56) or 'resnet<6n+2>_cl_lite' "
                     "(cl-lite's CIFAR ResNet, e.g. resnet32_cl_lite)")
