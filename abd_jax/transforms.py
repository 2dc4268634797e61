"""Host-side image transforms for variable-size datasets (ImageNet; docs/algorithm.md §1):
numpy and PIL only, no JAX. Training: random-resized crop to the model input; test: resize the shorter
side, then centre crop. Flips, colour jitter and normalisation stay in the on-device
augmentation (`augment.augment_batch`).

`train_transform(spec)` / `test_transform(spec)` return picklable callables
`(image uint8 [h, w, c], rng: np.random.Generator) -> uint8 [H, W, C]` (spec.image_shape),
for data loaders that run them in worker processes.
"""
import dataclasses
import math

import numpy as np
from PIL import Image

# Test-time resize = size / 0.875 (256 for 224), the usual ImageNet evaluation ratio.
CENTER_CROP_FRACTION = 0.875


def _to_pil(image: np.ndarray) -> Image.Image:
    """uint8 [h, w], [h, w, 1] or [h, w, 3] -> a PIL image ("L" or "RGB")."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
            image.ndim == 3 and image.shape[-1] not in (1, 3)):
        raise ValueError(f"expected a uint8 image [h, w], [h, w, 1] or [h, w, 3], got "
                         f"{image.dtype} {image.shape}")
    return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)


def _from_pil(image: Image.Image, like: np.ndarray) -> np.ndarray:
    """A PIL image back to uint8 with `like`'s channel layout ([h, w, 1] stays [h, w, 1])."""
    pixels = np.asarray(image, np.uint8)
    return pixels[..., None] if np.ndim(like) == 3 and pixels.ndim == 2 else pixels


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [h, w] / [h, w, 1] / [h, w, 3] -> [h, w, channels] (grey is repeated to RGB;
    RGB to grey uses PIL's ITU-R 601 luma)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == channels:
        return image
    if image.shape[-1] == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    if image.shape[-1] == 3 and channels == 1:
        return np.asarray(Image.fromarray(image).convert("L"), np.uint8)[..., None]
    raise ValueError(f"cannot turn an image of shape {image.shape} into {channels} channels")


def crop_window(height: int, width: int, rng: np.random.Generator,
                scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) of an Inception-style random crop of an image
    [height, width]: area fraction uniform in `scale`, aspect ratio (w/h) log-uniform in
    `ratio`; after 10 draws that do not fit, the centred crop of the whole image with its
    aspect ratio clamped into `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, int(round(height * max(ratio)))
    else:
        crop_h, crop_w = height, width
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int = 224,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """uint8 [h, w, c] -> uint8 [size, size, c]: the `crop_window` sub-image, resized
    (PIL bilinear, antialiased when shrinking). c in {1, 3}; [h, w] gives [size, size]."""
    pil = _to_pil(image)
    top, left, crop_h, crop_w = crop_window(pil.height, pil.width, rng, scale, ratio)
    resized = pil.resize((size, size), Image.BILINEAR,
                         box=(left, top, left + crop_w, top + crop_h))
    return _from_pil(resized, image)


def resize_center_crop(image: np.ndarray, resize: int = 256, size: int = 224) -> np.ndarray:
    """uint8 [h, w, c] -> uint8 [size, size, c]: shorter side resized (PIL bilinear) to
    `resize` (the longer one in proportion, truncated), then the centred size x size crop."""
    pil = _to_pil(image)
    if size > resize:
        raise ValueError(f"crop size {size} is larger than the resized shorter side {resize}")
    w, h = pil.size
    new_w, new_h = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    if (new_w, new_h) != (w, h):
        pil = pil.resize((new_w, new_h), Image.BILINEAR)
    top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
    return _from_pil(pil.crop((left, top, left + size, top + size)), image)


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop:
    """(image uint8 [h, w, c], rng) -> uint8 [size, size, channels]; `random_resized_crop`."""
    size: int
    channels: int = 3
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        crop = random_resized_crop(image, rng, self.size, self.scale, self.ratio)
        return to_channels(crop, self.channels)


@dataclasses.dataclass(frozen=True)
class ResizeCenterCrop:
    """(image uint8 [h, w, c], rng unused) -> uint8 [size, size, channels];
    `resize_center_crop`."""
    resize: int
    size: int
    channels: int = 3

    def __call__(self, image: np.ndarray, rng: np.random.Generator = None) -> np.ndarray:
        del rng
        return to_channels(resize_center_crop(image, self.resize, self.size), self.channels)


@dataclasses.dataclass(frozen=True)
class Identity:
    """(image, rng unused) -> the image unchanged (fixed-size datasets)."""

    def __call__(self, image: np.ndarray, rng: np.random.Generator = None) -> np.ndarray:
        del rng
        return image


def _square_size(spec) -> int:
    height, width, _ = spec.image_shape
    if height != width:
        raise ValueError(f"{spec.tfds_name}: variable-size transforms crop squares; "
                         f"image_shape {spec.image_shape} is not square")
    return height


def train_transform(spec):
    """Host-side training transform of `spec` (a `data.DatasetSpec`): `RandomResizedCrop` to
    spec.image_shape for a variable-size dataset, else `Identity`. No flip (on device)."""
    if not spec.variable_size:
        return Identity()
    return RandomResizedCrop(_square_size(spec), spec.image_shape[-1])


def test_transform(spec):
    """Host-side test transform of `spec`: resize the shorter side to size / 0.875 (256 for
    224) and centre-crop to spec.image_shape for a variable-size dataset, else `Identity`."""
    if not spec.variable_size:
        return Identity()
    size = _square_size(spec)
    return ResizeCenterCrop(int(round(size / CENTER_CROP_FRACTION)), size,
                            spec.image_shape[-1])
