"""Host-side ImageNet transforms: random-resized crop and resize + centre crop."""
import pickle

import numpy as np
import pytest

from abd_jax import data as data_lib
from abd_jax import transforms

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def _coordinate_image(height, width):
    """uint8 [height, width, 3]: channel 0 = row, channel 1 = column, channel 2 = 0."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("shape", [(300, 200, 3), (100, 400, 3), (50, 60, 1), (50, 60)])
def test_output_shapes_and_dtypes_keep_the_channels(shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out_shape = (112, 112) + shape[2:]
    crop = transforms.random_resized_crop(image, np.random.default_rng(1), size=112)
    assert crop.shape == out_shape and crop.dtype == np.uint8
    center = transforms.resize_center_crop(image, resize=128, size=112)
    assert center.shape == out_shape and center.dtype == np.uint8


def test_random_resized_crop_is_deterministic_for_a_seeded_generator():
    image = np.random.default_rng(0).integers(0, 256, (180, 240, 3), dtype=np.uint8)
    first = transforms.random_resized_crop(image, np.random.default_rng(7))
    np.testing.assert_array_equal(first,
                                  transforms.random_resized_crop(image, np.random.default_rng(7)))
    assert not np.array_equal(first,
                              transforms.random_resized_crop(image, np.random.default_rng(8)))


def test_crop_windows_lie_inside_with_area_and_aspect_in_range():
    rng = np.random.default_rng(0)
    fractions = []
    for height, width in [(200, 250), (375, 500), (500, 333), (64, 640)]:
        for _ in range(500):
            top, left, h, w = transforms.crop_window(height, width, rng, SCALE, RATIO)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
            if (height, width) == (64, 640):
                continue  # mostly the fallback (too wide for large areas)
            # rounding the sides to whole pixels moves the area / aspect by < 1 pixel per side
            area = h * w / (height * width)
            tol = (h + w + 1) / (height * width)
            assert SCALE[0] - tol <= area <= SCALE[1] + tol
            assert RATIO[0] * (1 - 1 / h) - 1 / h <= w / h <= RATIO[1] * (1 + 1 / h) + 1 / h
            fractions.append(area)
    assert min(fractions) < 0.15 and max(fractions) > 0.9  # the whole range is drawn


def test_crop_window_falls_back_to_the_centre_crop_with_a_clamped_aspect():
    rng = np.random.default_rng(0)
    # Area fractions above 1 never fit: the fallback.
    assert transforms.crop_window(100, 400, rng, (2, 3), RATIO) == (0, 133, 100, 133)
    assert transforms.crop_window(400, 100, rng, (2, 3), RATIO) == (133, 0, 133, 100)
    assert transforms.crop_window(100, 120, rng, (2, 3), RATIO) == (0, 0, 100, 120)


def test_random_resized_crop_is_the_resized_window_of_the_image():
    # Pixels hold their coordinates, so the crop's pixels tell which source window it shows.
    height, width, size = 200, 250, 96
    image = _coordinate_image(height, width)
    for seed in range(20):
        crop = transforms.random_resized_crop(image, np.random.default_rng(seed), size=size)
        top, left, h, w = transforms.crop_window(height, width, np.random.default_rng(seed))
        # Output pixel i shows source coordinate top + (i + 0.5) * h / size - 0.5 (bilinear);
        # uint8 rounding and clipping at the image border cost at most one unit.
        rows = top + (np.arange(size) + 0.5) * h / size - 0.5
        cols = left + (np.arange(size) + 0.5) * w / size - 0.5
        np.testing.assert_allclose(crop[:, 0, 0], np.clip(rows, 0, height - 1), atol=1.01)
        np.testing.assert_allclose(crop[0, :, 1], np.clip(cols, 0, width - 1), atol=1.01)
        # The window read back from the crop's corners alone has area and aspect in range.
        h_seen = (int(crop[-1, 0, 0]) - int(crop[0, 0, 0])) * size / (size - 1)
        w_seen = (int(crop[0, -1, 1]) - int(crop[0, 0, 1])) * size / (size - 1)
        area = h_seen * w_seen / (height * width)
        assert SCALE[0] * 0.9 <= area <= SCALE[1] * 1.05
        assert RATIO[0] * 0.9 <= w_seen / h_seen <= RATIO[1] * 1.1


def test_a_full_window_at_the_output_size_is_the_image_itself():
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    crop = transforms.random_resized_crop(image, np.random.default_rng(0), size=64,
                                          scale=(1, 1), ratio=(1, 1))
    np.testing.assert_array_equal(crop, image)


def _thirds(height, width):
    """uint8 [height, width, 3]: red, green, blue in the left, centre and right thirds."""
    band = np.arange(width) * 3 // width
    image = np.zeros((height, width, 3), np.uint8)
    image[:, :, 0][:, band == 0] = 255
    image[:, :, 1][:, band == 1] = 255
    image[:, :, 2][:, band == 2] = 255
    return image


@pytest.mark.parametrize("height,width,resize", [(256, 512, 256), (512, 1024, 256),
                                                 (1024, 512, 256)])
def test_resize_center_crop_keeps_the_centre(height, width, resize):
    image = _thirds(height, width)
    crop = transforms.resize_center_crop(image, resize=resize, size=224)
    assert crop.shape == (224, 224, 3)
    if width > height:
        # Resized to 256 x 512 (or kept), then columns 144..367 of the left/centre/right
        # thirds (boundaries at 170.7 and 341.3): red 0..26, green 27..197, blue 198..223.
        expected = np.zeros((224, 3), np.uint8)
        expected[:27, 0], expected[27:198, 1], expected[198:, 2] = 255, 255, 255
        exact = np.r_[0:26, 28:197, 199:224] if height != resize else np.arange(224)
        for row in (0, 100, 223):
            np.testing.assert_array_equal(crop[row, exact], expected[exact])
    else:
        # Portrait: resized to 256 wide x 512 tall, then rows 144..367 and columns 16..239
        # (columns 16..239 of it: band of column j + 16 = (j + 16) * 3 // 256).
        for column, colour in ((10, [255, 0, 0]), (112, [0, 255, 0]), (213, [0, 0, 255])):
            np.testing.assert_array_equal(crop[:, column], np.broadcast_to(colour, (224, 3)))


def test_greyscale_images_come_out_with_the_specs_channels():
    spec = data_lib.DATASETS["imagenet2012"]
    rng = np.random.default_rng(0)
    for image in (rng.integers(0, 256, (90, 120), dtype=np.uint8),
                  rng.integers(0, 256, (90, 120, 1), dtype=np.uint8)):
        for transform in (transforms.train_transform(spec), transforms.test_transform(spec)):
            out = transform(image, np.random.default_rng(0))
            assert out.shape == (224, 224, 3) and out.dtype == np.uint8
            np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_transforms_of_a_spec_are_picklable_and_sized_by_it():
    spec = data_lib.DATASETS["imagenet2012"]
    train, test = transforms.train_transform(spec), transforms.test_transform(spec)
    assert train == transforms.RandomResizedCrop(224, 3)
    assert test == transforms.ResizeCenterCrop(256, 224, 3)
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    for transform in (train, test):
        clone = pickle.loads(pickle.dumps(transform))
        np.testing.assert_array_equal(clone(image, np.random.default_rng(3)),
                                      transform(image, np.random.default_rng(3)))
    np.testing.assert_array_equal(test(image, None),
                                  transforms.resize_center_crop(image, 256, 224))


def test_fixed_size_specs_pass_images_through():
    spec = data_lib.DATASETS["cifar100"]
    image = np.zeros((32, 32, 3), np.uint8)
    for transform in (transforms.train_transform(spec), transforms.test_transform(spec)):
        assert transform(image, np.random.default_rng(0)) is image
        pickle.loads(pickle.dumps(transform))
