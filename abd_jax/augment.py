"""Training augmentation on device, per image (one PRNG key each, vmapped), and the
normalisation every model input gets: the release's recipe (`policy="abd"`) and the PyCIL
line's with AutoAugment (`policy="pycil"`, `abd_jax.autoaugment`)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from abd_jax import autoaugment


AUGMENT_POLICIES = ("abd", "pycil")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation; a stage is off when its parameter is 0 / False. `policy`: "abd"
    (ABD's release: ColorJitter(brightness, contrast), flip, crop) or "pycil" (the PyCIL
    line's CIFAR recipe: crop, flip, ColorJitter(brightness), AutoAugment's CIFAR10Policy, on
    uint8 levels as Pillow computes them; `contrast` is not part of it and is not read)."""
    brightness: float = 63 / 255
    contrast: float = 0.8
    flip: bool = True
    crop_padding: int = 4
    policy: str = "abd"

    def __post_init__(self):
        if self.policy not in AUGMENT_POLICIES:
            raise ValueError(f"augment.policy={self.policy!r}: expected one of "
                             f"{AUGMENT_POLICIES} ('abd': ABD's recipe; 'pycil': crop + flip + "
                             "ColorJitter(brightness) + AutoAugment CIFAR10Policy)")


def _standardize(x: jax.Array, mean, std) -> jax.Array:
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


@jax.jit
def normalize(images: jax.Array, mean, std) -> jax.Array:
    """uint8 [..., C] -> float32 [..., C], (x / 255 - mean) / std."""
    return _standardize(images.astype(jnp.float32) / 255.0, mean, std)


def augment_draws(key: jax.Array, aug: AugmentConfig) -> dict:
    """One image's random draws: brightness and contrast factors, uniform in
    [max(0, 1 - a), 1 + a]; `contrast_first`, the order of the two (torchvision's
    `ColorJitter` shuffles its transforms per image); `flip`; the crop's `top`, `left`
    offsets into the padded image, uniform in [0, 2p]. Policy "pycil": `top`, `left`, `flip`,
    `brightness` (no contrast), and `autoaugment.policy_draws`' `sub_policy`, `apply`, `sign`."""
    factor = lambda k, a: jax.random.uniform(k, (), minval=max(0.0, 1 - a), maxval=1 + a)
    if aug.policy == "pycil":
        k_crop, k_flip, k_bright, k_policy = jax.random.split(key, 4)
        top, left = jax.random.randint(k_crop, (2,), 0, 2 * aug.crop_padding + 1)
        return dict(top=top, left=left, flip=jax.random.bernoulli(k_flip),
                    brightness=factor(k_bright, aug.brightness),
                    **autoaugment.policy_draws(k_policy))
    k_bright, k_contrast, k_flip, k_crop = jax.random.split(key, 4)
    top, left = jax.random.randint(k_crop, (2,), 0, 2 * aug.crop_padding + 1)
    return dict(brightness=factor(k_bright, aug.brightness),
                contrast=factor(k_contrast, aug.contrast),
                contrast_first=jax.random.bernoulli(jax.random.fold_in(key, 4)),
                flip=jax.random.bernoulli(k_flip), top=top, left=left)


def _augment_one(key: jax.Array, x: jax.Array, aug: AugmentConfig) -> jax.Array:
    """One image in [0, 1], float32 [H, W, C] -> augmented [H, W, C] in [0, 1], as the
    release's torchvision pipeline: ColorJitter (brightness: x * b; contrast: c x + (1 - c)
    mean(gray(x)); each clipped to [0, 1]; in a random order), horizontal flip, then a random
    crop of the image padded with black (0) by `crop_padding` pixels."""
    d = augment_draws(key, aug)
    brightness = lambda v: jnp.clip(v * d["brightness"], 0.0, 1.0)

    def contrast(v):
        gray = v[..., 0] if v.shape[-1] == 1 else v @ jnp.array([0.299, 0.587, 0.114])
        return jnp.clip(d["contrast"] * v + (1 - d["contrast"]) * gray.mean(), 0.0, 1.0)

    if aug.brightness and aug.contrast:
        x = jnp.where(d["contrast_first"], brightness(contrast(x)), contrast(brightness(x)))
    elif aug.brightness:
        x = brightness(x)
    elif aug.contrast:
        x = contrast(x)
    if aug.flip:
        x = jnp.where(d["flip"], x[:, ::-1], x)
    if aug.crop_padding:
        x = _pad_crop(x, d, aug.crop_padding)
    return x


def _pad_crop(x: jax.Array, d: dict, p: int) -> jax.Array:
    """[H, W, C] padded with black (0) by `p` pixels, cropped back to [H, W] at the draws'
    `top`, `left` (torchvision's `RandomCrop(size, padding=p)`)."""
    padded = jnp.pad(x, ((p, p), (p, p), (0, 0)))
    return jax.lax.dynamic_slice(padded, (d["top"], d["left"], 0), x.shape)


def _pycil_one(key: jax.Array, x: jax.Array, aug: AugmentConfig) -> jax.Array:
    """One image as float32 [H, W, C] integers 0..255 -> the PyCIL line's CIFAR training view
    before `ToTensor` (FeCAM `models/fecam.py`, d2479b7; PyCIL `utils/data.py` iCIFAR100_AA,
    f3509b8, less its Cutout), same scale: RandomCrop(padding, black), RandomHorizontalFlip,
    ColorJitter's brightness as Pillow's `Brightness` (floor(b x) clipped: the image stays
    uint8), then `autoaugment.cifar10_policy`."""
    d = augment_draws(key, aug)
    if aug.crop_padding:
        x = _pad_crop(x, d, aug.crop_padding)
    if aug.flip:
        x = jnp.where(d["flip"], x[:, ::-1], x)
    if aug.brightness:
        x = autoaugment.blend(jnp.zeros_like(x), x, d["brightness"])
    return autoaugment.cifar10_policy(x, d)


@functools.partial(jax.jit, static_argnames="aug")
def augment_batch(rng: jax.Array, images: jax.Array, aug: AugmentConfig, mean,
                  std) -> jax.Array:
    """uint8 [B, H, W, C] -> augmented, normalised float32 [B, H, W, C]; one key per sample.
    Policy "pycil" works on the uint8 levels and divides by 255 at the end (`ToTensor`)."""
    if aug.policy == "pycil":
        keys = jax.random.split(rng, images.shape[0])
        x = jax.vmap(functools.partial(_pycil_one, aug=aug))(keys, images.astype(jnp.float32))
        return _standardize(x / 255.0, mean, std)
    x = images.astype(jnp.float32) / 255.0
    keys = jax.random.split(rng, images.shape[0])
    x = jax.vmap(functools.partial(_augment_one, aug=aug))(keys, x)
    return _standardize(x, mean, std)
