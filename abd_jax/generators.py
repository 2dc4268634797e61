"""The generative models: ABD's model-inversion generator (DFAD's, docs/algorithm.md §2) and
DGR's variational autoencoder (the release's). Layers are initialised as PyTorch's defaults
(`models.torch_default_kernel`, `models.torch_default_bias`), as the release keeps them."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from abd_jax.models import torch_default_bias, torch_default_kernel


class Generator(nn.Module):
    """DFAD generator (docs/algorithm.md §2): z [B, z_dim] -> images [B, S, S, C], already
    normalised.

    Linear -> 128 x (S/2^k)^2 -> BN -> k x (nearest upsample x2 -> conv3x3 -> BN -> LeakyReLU)
    -> conv3x3 C -> tanh -> BN without scale/offset. Inner BNs use `inner_bn_eps` (0.8 in the
    release, a PyTorch positional-argument quirk kept for fidelity). Linear and convolutions
    are initialised as PyTorch's defaults (the release keeps them). Train mode normalises with
    batch statistics; eval mode (sampling) with running averages.
    `stage_channels` gives each upsampling stage's conv width (32x32: (128, 64); 64x64:
    (128, 128, 64); 224x224 with base 64 and 7x7 start: (64,) * 5).
    `dtype` is the compute dtype (parameters stay float32); the images come out float32.
    """

    image_size: int = 32
    channels: int = 3
    z_dim: int = 1000
    base_channels: int = 128
    stage_channels: Sequence[int] = (128, 64)
    inner_bn_eps: float = 0.8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z, train: bool = True):
        start = self.image_size // 2 ** len(self.stage_channels)
        if start * 2 ** len(self.stage_channels) != self.image_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by "
                             f"2^{len(self.stage_channels)} upsampling stages")
        bn = lambda eps, **kw: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                            epsilon=eps, dtype=self.dtype, **kw)
        x = nn.Dense(self.base_channels * start * start, kernel_init=torch_default_kernel,
                     bias_init=torch_default_bias(z.shape[-1]), dtype=self.dtype,
                     name="fc")(z)
        x = x.reshape(z.shape[0], start, start, self.base_channels)
        x = bn(1e-5, name="bn0")(x)
        conv = lambda width, name: nn.Conv(width, (3, 3), padding=1,
                                           kernel_init=torch_default_kernel,
                                           bias_init=torch_default_bias(9 * x.shape[-1]),
                                           dtype=self.dtype, name=name)
        for i, width in enumerate(self.stage_channels):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest upsample x2
            x = conv(width, f"conv{i + 1}")(x)
            x = nn.leaky_relu(bn(self.inner_bn_eps, name=f"bn{i + 1}")(x), 0.2)
        x = conv(self.channels, "conv_out")(x)
        x = jnp.tanh(x)
        x = bn(1e-5, use_scale=False, use_bias=False, name="bn_out")(x)
        return x.astype(jnp.float32)


GENERATOR_PRESETS = {
    32: dict(base_channels=128, stage_channels=(128, 64)),
    64: dict(base_channels=128, stage_channels=(128, 128, 64)),
    224: dict(base_channels=64, stage_channels=(64,) * 5),
}


def create_generator(image_size: int, channels: int, z_dim: int = 1000,
                     inner_bn_eps: float = 0.8, dtype: str = "float32") -> Generator:
    """The generator (docs/algorithm.md §2) for 32x32 (CIFAR), 64x64 (Tiny-ImageNet) or 224x224
    (ImageNet);
    other sizes (e.g. 8x8 digits) use the 32x32 layout with as many x2 stages as fit (<= 2).
    dtype: compute dtype, "float32" or "bfloat16"."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"generator dtype {dtype!r}: use 'float32' or 'bfloat16' "
                         "(--config.synthesis.generator_dtype, or --config.dtype)")
    if image_size in GENERATOR_PRESETS:
        preset = GENERATOR_PRESETS[image_size]
    else:
        stages = 2 if image_size % 4 == 0 else 1
        preset = dict(base_channels=128, stage_channels=(128, 64)[:stages])
    return Generator(image_size=image_size, channels=channels, z_dim=z_dim,
                     inner_bn_eps=inner_bn_eps, dtype=jnp.dtype(dtype), **preset)


class ConvVAE(nn.Module):
    """DGR's variational autoencoder (the release's `AutoEncoder`, after van de Ven & Tolias):
    images in [0, 1] `[B, S, S, C]` -> 3 x (conv 4x4 stride 2 + ReLU: 64, 128, 512 channels)
    -> Linear to mean and log-variance `[B, z_dim]`; z -> Linear to 512 x (S/8)^2 -> 3 x
    (transposed conv 4x4 stride 2: 256, 64, C; ReLU between) -> sigmoid. No BatchNorm; layers
    initialised as PyTorch's defaults."""

    image_size: int = 32
    channels: int = 3
    z_dim: int = 1024

    def setup(self):
        if self.image_size % 8:
            raise ValueError(f"the DGR autoencoder needs an image size divisible by 8, got "
                             f"{self.image_size}")
        side = self.image_size // 8
        conv = lambda f, fan_in: nn.Conv(f, (4, 4), (2, 2), padding=1,
                                         kernel_init=torch_default_kernel,
                                         bias_init=torch_default_bias(16 * fan_in))
        dense = lambda f, fan_in: nn.Dense(f, kernel_init=torch_default_kernel,
                                           bias_init=torch_default_bias(fan_in))
        deconv = lambda f, fan_in: nn.ConvTranspose(f, (4, 4), (2, 2), padding="SAME",
                                                    kernel_init=torch_default_kernel,
                                                    bias_init=torch_default_bias(16 * fan_in))
        self.encoder = [conv(64, self.channels), conv(128, 64), conv(512, 128)]
        self.to_mean = dense(self.z_dim, 512 * side * side)
        self.to_logvar = dense(self.z_dim, 512 * side * side)
        self.project = dense(512 * side * side, self.z_dim)
        self.decoder = [deconv(256, 512), deconv(64, 256), deconv(self.channels, 64)]

    def encode(self, x):
        """(mean, log-variance) `[B, z_dim]` of q(z | x)."""
        for layer in self.encoder:
            x = nn.relu(layer(x))
        x = x.reshape(x.shape[0], -1)
        return self.to_mean(x), self.to_logvar(x)

    def decode(self, z):
        """Images in [0, 1] `[B, S, S, C]` from latents `[B, z_dim]`."""
        side = self.image_size // 8
        x = self.project(z).reshape(z.shape[0], side, side, 512)
        for i, layer in enumerate(self.decoder):
            x = layer(x)
            if i < len(self.decoder) - 1:
                x = nn.relu(x)
        return nn.sigmoid(x)

    def __call__(self, x, rng=None):
        """(reconstruction, mean, log-variance) with z = mean + exp(logvar / 2) * N(0, I)
        (z = mean without `rng`)."""
        mean, logvar = self.encode(x)
        z = mean if rng is None else (
            mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape))
        return self.decode(z), mean, logvar
