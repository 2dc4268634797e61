"""Tests for abd_jax.autoaugment: AutoAugment's CIFAR-10 policy as PyCIL runs it in Pillow.

Each operation is pinned by hand on a tiny image, then every operation, bin and sign is held
against Pillow itself (PyCIL `utils/ops.py`'s calls, written out below), and the whole "pycil"
augmentation against PyCIL's transforms run in Pillow with the same draws."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from abd_jax import autoaugment as aa
from abd_jax import augment

# One program per image shape: `op` as an index into aa.OPS is traced, like bin and sign.
_apply = jax.jit(aa.apply_op)
_apply_all = jax.jit(jax.vmap(aa.apply_op, in_axes=(None, 0, 0, 0)))


def run(x, name, level, sign=1):
    return np.asarray(_apply(jnp.asarray(x, jnp.float32), aa.OPS.index(name), level, sign))


def test_policy_table_and_magnitudes_are_pycils():
    """The 25 sub-policies and the magnitude ranges as PyCIL `utils/autoaugment.py` writes
    them (f3509b8; FeCAM d2479b7 the same)."""
    fillcolor = (128, 128, 128)
    SubPolicy = lambda p1, op1, m1, p2, op2, m2, fill: (p1, op1, m1, p2, op2, m2)  # noqa: E731
    official = [
        SubPolicy(0.1, "invert", 7, 0.2, "contrast", 6, fillcolor),
        SubPolicy(0.7, "rotate", 2, 0.3, "translateX", 9, fillcolor),
        SubPolicy(0.8, "sharpness", 1, 0.9, "sharpness", 3, fillcolor),
        SubPolicy(0.5, "shearY", 8, 0.7, "translateY", 9, fillcolor),
        SubPolicy(0.5, "autocontrast", 8, 0.9, "equalize", 2, fillcolor),

        SubPolicy(0.2, "shearY", 7, 0.3, "posterize", 7, fillcolor),
        SubPolicy(0.4, "color", 3, 0.6, "brightness", 7, fillcolor),
        SubPolicy(0.3, "sharpness", 9, 0.7, "brightness", 9, fillcolor),
        SubPolicy(0.6, "equalize", 5, 0.5, "equalize", 1, fillcolor),
        SubPolicy(0.6, "contrast", 7, 0.6, "sharpness", 5, fillcolor),

        SubPolicy(0.7, "color", 7, 0.5, "translateX", 8, fillcolor),
        SubPolicy(0.3, "equalize", 7, 0.4, "autocontrast", 8, fillcolor),
        SubPolicy(0.4, "translateY", 3, 0.2, "sharpness", 6, fillcolor),
        SubPolicy(0.9, "brightness", 6, 0.2, "color", 8, fillcolor),
        SubPolicy(0.5, "solarize", 2, 0.0, "invert", 3, fillcolor),

        SubPolicy(0.2, "equalize", 0, 0.6, "autocontrast", 0, fillcolor),
        SubPolicy(0.2, "equalize", 8, 0.6, "equalize", 4, fillcolor),
        SubPolicy(0.9, "color", 9, 0.6, "equalize", 6, fillcolor),
        SubPolicy(0.8, "autocontrast", 4, 0.2, "solarize", 8, fillcolor),
        SubPolicy(0.1, "brightness", 3, 0.7, "color", 0, fillcolor),

        SubPolicy(0.4, "solarize", 5, 0.9, "autocontrast", 3, fillcolor),
        SubPolicy(0.9, "translateY", 9, 0.7, "translateY", 9, fillcolor),
        SubPolicy(0.9, "autocontrast", 2, 0.8, "solarize", 3, fillcolor),
        SubPolicy(0.8, "equalize", 8, 0.1, "invert", 3, fillcolor),
        SubPolicy(0.7, "translateY", 9, 0.9, "autocontrast", 1, fillcolor),
    ]
    assert tuple(official) == aa.CIFAR10_POLICY and aa.FILL == fillcolor[0]
    ranges = {
        "shearX": np.linspace(0, 0.3, 10),
        "shearY": np.linspace(0, 0.3, 10),
        "translateX": np.linspace(0, 150 / 331, 10),
        "translateY": np.linspace(0, 150 / 331, 10),
        "rotate": np.linspace(0, 30, 10),
        "color": np.linspace(0.0, 0.9, 10),
        "posterize": np.round(np.linspace(8, 4, 10), 0).astype(int),
        "solarize": np.linspace(256, 0, 10),
        "contrast": np.linspace(0.0, 0.9, 10),
        "sharpness": np.linspace(0.0, 0.9, 10),
        "brightness": np.linspace(0.0, 0.9, 10),
        "autocontrast": [0] * 10,
        "equalize": [0] * 10,
        "invert": [0] * 10,
    }
    assert sorted(ranges) == sorted(aa.OPS)
    for op, values in ranges.items():
        assert [aa.magnitude(op, k) for k in range(10)] == list(values), op
    assert list(ranges["posterize"]) == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]


def test_posterize_solarize_invert_exactly():
    v = np.array([0, 7, 8, 50, 60, 100, 127, 128, 198, 199, 200, 227, 228, 254, 255, 255])
    x = np.stack([v, v[::-1], np.full(16, 77)], -1).reshape(4, 4, 3)
    # posterize bin 7 keeps 5 bits: v & 0b11111000
    want = [0, 0, 8, 48, 56, 96, 120, 128, 192, 192, 200, 224, 224, 248, 248, 248]
    np.testing.assert_array_equal(run(x, "posterize", 7)[..., 0].ravel(), want)
    np.testing.assert_array_equal(run(x, "posterize", 0), x)  # 8 bits: unchanged
    # solarize bin 2: threshold 199.11; v < threshold kept, the rest 255 - v
    want = [0, 7, 8, 50, 60, 100, 127, 128, 198, 199, 55, 28, 27, 1, 0, 0]
    np.testing.assert_array_equal(run(x, "solarize", 2)[..., 0].ravel(), want)
    np.testing.assert_array_equal(run(x, "solarize", 0), x)  # threshold 256: unchanged
    np.testing.assert_array_equal(run(x, "solarize", 9), 255 - x)  # threshold 0: all
    np.testing.assert_array_equal(run(x, "invert", 3), 255 - x)


def test_autocontrast_on_known_histograms():
    """Each channel stretched from [lo, hi] to [0, 255] with Pillow's float64 arithmetic:
    int(v * 255 / (hi - lo) - lo * 255 / (hi - lo)), which maps 100 of {50, 60, 100} and 25
    of {0, 10, 20, 25} to 254, not 255; a flat channel is left alone."""
    ch0 = np.array([50, 60, 100, 60] * 4)
    ch1 = np.array([0, 10, 20, 25] * 4)
    x = np.stack([ch0, ch1, np.full(16, 9)], -1).reshape(4, 4, 3)
    out = run(x, "autocontrast", 8).reshape(16, 3)
    np.testing.assert_array_equal(out[:4, 0], [0, 51, 254, 51])
    np.testing.assert_array_equal(out[:4, 1], [0, 102, 204, 254])
    np.testing.assert_array_equal(out[:, 2], 9)
    full = np.stack([np.arange(0, 256, 17)] * 3, -1).reshape(4, 4, 3)  # 0 .. 255: unchanged
    np.testing.assert_array_equal(run(full, "autocontrast", 0), full)


def test_equalize_on_known_histograms():
    """Pillow's equalize: step = (pixels - count of the top value) // 255, table[v] =
    (step // 2 + pixels below v) // step, clipped to 255; step 0 leaves the channel alone."""
    ch0 = np.repeat([0, 128, 255], [512, 256, 256])  # step 3: 0 -> 0, 128 -> 171, 255 -> 255
    ch1 = np.repeat([10, 20, 30], [255, 255, 514])  # step 510 // 255 = 2: 0, 128, 255
    ch2 = np.repeat([5, 6], [1000, 24])  # step 3: 0, 1001 // 3 -> 255
    x = np.stack([ch0, ch1, ch2], -1).reshape(32, 32, 3)
    out = run(x, "equalize", 0).reshape(-1, 3)
    for c, table in enumerate(({0: 0, 128: 171, 255: 255}, {10: 0, 20: 128, 30: 255},
                               {5: 0, 6: 255})):
        np.testing.assert_array_equal(out[:, c], [table[v] for v in x.reshape(-1, 3)[:, c]])
    small = np.random.RandomState(0).randint(0, 256, (4, 4, 3))  # 16 pixels: step 0
    np.testing.assert_array_equal(run(small, "equalize", 5), small)


def _pil_gray(x):
    return (19595 * x[..., 0] + 38470 * x[..., 1] + 7471 * x[..., 2] + 0x8000) >> 16


def _blend(d, x, f):
    """Pillow's Image.blend in float32, two roundings (numpy does not fuse)."""
    d, x = d.astype(np.float32), x.astype(np.float32)
    return np.clip(np.floor(d + np.float32(f) * (x - d)), 0, 255)


def test_enhance_operations_by_hand():
    """Color, Contrast, Sharpness and Brightness: blends of the image with Pillow's grey image,
    flat mean-grey image, SMOOTH-filtered image and black, at factor 1 +- magnitude."""
    x = np.random.RandomState(1).randint(0, 256, (4, 5, 3))
    x[0, 0] = (10, 20, 30)
    f = lambda op, level, sign: 1 + sign * aa.magnitude(op, level)  # noqa: E731
    assert np.float32(f("color", 3, -1)) == np.float32(0.7)
    gray = _pil_gray(x)
    assert gray[0, 0] == 18  # (195950 + 769400 + 224130 + 32768) >> 16
    np.testing.assert_array_equal(run(x, "color", 3, -1),
                                  _blend(gray[..., None] + 0 * x, x, f("color", 3, -1)))
    mean = int(gray.mean() + 0.5)
    np.testing.assert_array_equal(run(x, "contrast", 6, 1),
                                  _blend(np.full_like(x, mean), x, f("contrast", 6, 1)))
    np.testing.assert_array_equal(run(x, "brightness", 7, 1),
                                  _blend(0 * x, x, f("brightness", 7, 1)))
    smooth = x.copy()
    for i in range(1, 3):
        for j in range(1, 4):
            s = x[i - 1:i + 2, j - 1:j + 2].sum((0, 1)) + 4 * x[i, j]
            smooth[i, j] = np.floor(s / 13 + 0.5)
    np.testing.assert_array_equal(run(x, "sharpness", 9, -1),
                                  _blend(smooth, x, f("sharpness", 9, -1)))
    np.testing.assert_array_equal(run(x, "sharpness", 5, 1),
                                  _blend(smooth, x, f("sharpness", 5, 1)))
    for op in aa.ENHANCE:
        np.testing.assert_array_equal(run(x, op, 0, -1), x)  # factor 1


def _bicubic_row(row, pos):
    """Pillow's BICUBIC (a = -1) along one row at pixel-centre coordinate pos, edge-clamped,
    float64."""
    t = pos - 0.5
    i, d = int(np.floor(t)), t - np.floor(t)
    v1, v2, v3, v4 = (row[np.clip(i + k, 0, len(row) - 1)] for k in (-1, 0, 1, 2))
    return v2 + d * ((v3 - v1) + d * ((2 * (v1 - v2) + v3 - v4) + d * (-v1 + v2 - v3 + v4)))


def test_geometric_operations_by_hand():
    """Translations move whole pixels (Pillow's nearest: the pixel under the shifted centre),
    shears resample with Pillow's bicubic, rotation about the centre reads the nearest pixel;
    everything outside the source image is 128."""
    x = np.arange(36, dtype=np.float64).reshape(6, 6, 1) * 7
    fill = np.full((6, 6, 1), 128.0)
    # translateX bin 9: 150/331 * 6 = 2.72 pixels; centres x + 0.5 +- 2.72 -> x + 3 / x - 3
    want = fill.copy()
    want[:, :3] = x[:, 3:]
    np.testing.assert_array_equal(run(x, "translateX", 9, 1), want)
    want = fill.copy()
    want[:, 3:] = x[:, :3]
    np.testing.assert_array_equal(run(x, "translateX", 9, -1), want)
    # translateY bin 3: 0.91 pixels; y + 0.5 + 0.91 -> y + 1, y + 0.5 - 0.91 -> y - 1
    want = fill.copy()
    want[:5] = x[1:]
    np.testing.assert_array_equal(run(x, "translateY", 3, 1), want)
    want = fill.copy()
    want[1:] = x[:5]
    np.testing.assert_array_equal(run(x, "translateY", 3, -1), want)
    # shearX bin 8 (0.267): output (x, y) reads row y at x + 0.5 + s (y + 0.5)
    for level, sign in ((8, 1), (8, -1)):
        s = sign * aa.magnitude("shearX", level)
        want = fill.copy()
        for yy in range(6):
            for xx in range(6):
                pos = xx + 0.5 + s * (yy + 0.5)
                if 0 <= pos < 6:
                    want[yy, xx] = np.clip(np.floor(_bicubic_row(x[yy, :, 0], pos)), 0, 255)
        np.testing.assert_array_equal(run(x, "shearX", level, sign), want)
        sheared_y = run(np.swapaxes(x, 0, 1), "shearY", level, sign)  # the transpose
        np.testing.assert_array_equal(np.swapaxes(sheared_y, 0, 1), want)
    # rotate bin 2 (6.67 degrees, counter-clockwise for +; the policy's) and bin 9 (30):
    # source = centre + R (p - centre), the pixel under it
    for level, sign in ((2, 1), (2, -1), (9, 1), (9, -1)):
        t = np.radians(sign * aa.magnitude("rotate", level))
        want = fill.copy()
        for yy in range(6):
            for xx in range(6):
                px, py = xx + 0.5 - 3, yy + 0.5 - 3
                sx, sy = 3 + np.cos(t) * px - np.sin(t) * py, 3 + np.sin(t) * px + np.cos(t) * py
                if 0 <= sx < 6 and 0 <= sy < 6:
                    want[yy, xx] = x[int(sy), int(sx)]
        out = run(x, "rotate", level, sign)
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(out[2:4, 2:4], x[2:4, 2:4])
        assert (out[[0, 0, -1, -1], [0, -1, 0, -1]] == 128).all() == (level == 9)


def pil_op(img, op, magnitude, sign):
    """PyCIL `utils/ops.py`'s call for `op` (its random sign replaced by `sign`)."""
    fill = (128, 128, 128)
    if op in ("shearX", "shearY"):
        data_ = (1, magnitude * sign, 0, 0, 1, 0) if op == "shearX" else \
            (1, 0, 0, magnitude * sign, 1, 0)
        return img.transform(img.size, Image.AFFINE, data_, Image.BICUBIC, fillcolor=fill)
    if op == "translateX":
        return img.transform(img.size, Image.AFFINE,
                             (1, 0, magnitude * img.size[0] * sign, 0, 1, 0), fillcolor=fill)
    if op == "translateY":
        return img.transform(img.size, Image.AFFINE,
                             (1, 0, 0, 0, 1, magnitude * img.size[1] * sign), fillcolor=fill)
    if op == "rotate":
        rot = img.convert("RGBA").rotate(magnitude * sign)
        return Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert(img.mode)
    enhance = dict(color=ImageEnhance.Color, contrast=ImageEnhance.Contrast,
                   sharpness=ImageEnhance.Sharpness, brightness=ImageEnhance.Brightness)
    if op in enhance:
        return enhance[op](img).enhance(1 + magnitude * sign)
    return dict(posterize=lambda: ImageOps.posterize(img, magnitude),
                solarize=lambda: ImageOps.solarize(img, magnitude),
                autocontrast=lambda: ImageOps.autocontrast(img),
                equalize=lambda: ImageOps.equalize(img),
                invert=lambda: ImageOps.invert(img))[op]()


def _assert_as_pillow(got, want, shear):
    """Equal, or (after a shear) one level apart on a few pixels: the bicubic interpolation
    runs in float32 here and in double in Pillow."""
    diff = np.abs(np.asarray(got, np.int64) - np.asarray(want, np.int64))
    if shear:
        assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())
    else:
        assert diff.max() == 0, np.argwhere(diff)


def test_every_operation_bin_and_sign_matches_pillow():
    rng = np.random.RandomState(2)
    # 320 pixels: equalize's step is 1, not 0
    images = [rng.randint(0, 256, (20, 16, 3)), rng.randint(40, 90, (20, 16, 3)),
              np.repeat(rng.randint(0, 256, (20, 1, 3)), 16, 1)]
    ops, levels, signs = (np.array(v).ravel() for v in np.meshgrid(
        np.arange(len(aa.OPS)), np.arange(10), [-1, 1], indexing="ij"))
    for x in images:
        got = np.asarray(_apply_all(jnp.asarray(x, jnp.float32), ops, levels, signs))
        img = Image.fromarray(x.astype(np.uint8))
        for k, (o, level, sign) in enumerate(zip(ops, levels, signs)):
            op = aa.OPS[o]
            want = np.asarray(pil_op(img, op, aa.magnitude(op, level), sign))
            _assert_as_pillow(got[k], want, op.startswith("shear"))


def pil_sub_policy(img, row, apply, sign):
    """PyCIL's SubPolicy with the draws given: (the image, whether it sheared)."""
    p1, op1, m1, p2, op2, m2 = aa.CIFAR10_POLICY[row]
    sheared = False
    for slot, (op, level) in enumerate(((op1, m1), (op2, m2))):
        if apply[slot]:
            img = pil_op(img, op, aa.magnitude(op, level), sign[slot])
            sheared |= op.startswith("shear")
    return img, sheared


@pytest.mark.slow
def test_cifar10_policy_runs_the_drawn_sub_policy():
    """Every sub-policy with both operations on, each sign pattern, as Pillow runs it; then
    random draws."""
    rng = np.random.RandomState(3)
    rows = np.repeat(np.arange(25), 4)
    draws = dict(sub_policy=jnp.asarray(rows), apply=jnp.ones((100, 2), bool),
                 sign=jnp.asarray(np.tile([[1, 1], [1, -1], [-1, 1], [-1, -1]], (25, 1))))
    x = rng.randint(0, 256, (100, 8, 8, 3))
    policy = jax.jit(jax.vmap(aa.cifar10_policy))
    out = np.asarray(policy(jnp.asarray(x, jnp.float32), draws))
    for i in range(100):
        want, sheared = pil_sub_policy(Image.fromarray(x[i].astype(np.uint8)), rows[i], (1, 1),
                                       np.asarray(draws["sign"][i]))
        _assert_as_pillow(out[i], np.asarray(want), sheared)
    keys = jax.random.split(jax.random.key(0), 100)
    draws = jax.vmap(aa.policy_draws)(keys)
    out = np.asarray(policy(jnp.asarray(x, jnp.float32), draws))
    for i in range(100):
        d = {k: np.asarray(v[i]) for k, v in draws.items()}
        want, sheared = pil_sub_policy(Image.fromarray(x[i].astype(np.uint8)),
                                       int(d["sub_policy"]), d["apply"], d["sign"])
        _assert_as_pillow(out[i], np.asarray(want), sheared)


def test_policy_draws_follow_the_table_and_the_key():
    keys = jax.random.split(jax.random.key(1), 20000)
    d = {k: np.asarray(v) for k, v in jax.jit(jax.vmap(aa.policy_draws))(keys).items()}
    counts = np.bincount(d["sub_policy"], minlength=25)
    assert counts.min() > 650 and counts.max() < 950  # 800 expected each
    prob = np.array([(r[0], r[3]) for r in aa.CIFAR10_POLICY])[d["sub_policy"]]
    np.testing.assert_allclose(d["apply"].mean(0), prob.mean(0), atol=0.015)
    assert not d["apply"][prob == 0].any() and d["apply"][prob > 0].any()
    assert set(np.unique(d["sign"])) == {-1, 1} and abs(d["sign"].mean()) < 0.03
    same = jax.jit(aa.policy_draws)(keys[5])
    assert all(np.array_equal(same[k], d[k][5]) for k in d)


MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


@pytest.mark.slow
def test_pycil_augmentation_is_pycils_pipeline_in_pillow():
    """augment.augment_batch with policy "pycil" against PyCIL's train transforms run in Pillow
    with the same draws: RandomCrop(32, padding=4) (black), RandomHorizontalFlip,
    ColorJitter(brightness=63/255) (Pillow's Brightness), CIFAR10Policy, ToTensor,
    Normalize."""
    aug = augment.AugmentConfig(policy="pycil")
    images = np.random.RandomState(4).randint(0, 256, (48, 32, 32, 3)).astype(np.uint8)
    key = jax.random.key(9)
    out = np.asarray(augment.augment_batch(key, images, aug, MEAN, STD))
    keys = jax.random.split(key, len(images))
    for i, x in enumerate(images):
        d = {k: np.asarray(v) for k, v in augment.augment_draws(keys[i], aug).items()}
        padded = np.zeros((40, 40, 3), np.uint8)
        padded[4:36, 4:36] = x
        x = padded[d["top"]:d["top"] + 32, d["left"]:d["left"] + 32]
        x = x[:, ::-1] if d["flip"] else x
        img = ImageEnhance.Brightness(Image.fromarray(np.ascontiguousarray(x)))
        img, sheared = pil_sub_policy(img.enhance(float(d["brightness"])),
                                      int(d["sub_policy"]), d["apply"], d["sign"])
        want = (np.asarray(img, np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
        levels = np.round((out[i] * np.float32(STD) + np.float32(MEAN)) * 255)
        _assert_as_pillow(levels, np.asarray(img), sheared)
        np.testing.assert_allclose(out[i], want, atol=1.01 / 255 / min(STD))


@pytest.mark.slow
def test_pycil_fixed_key_same_output_other_keys_differ():
    images = np.random.RandomState(0).randint(0, 256, (48, 32, 32, 3)).astype(np.uint8)
    aug = augment.AugmentConfig(policy="pycil")  # the shapes above: no second compile
    batch = lambda seed: np.asarray(  # noqa: E731
        augment.augment_batch(jax.random.key(seed), images, aug, MEAN, STD))
    np.testing.assert_array_equal(batch(0), batch(0))
    assert not np.allclose(batch(0), batch(1))
    gray = augment.augment_batch(jax.random.key(0), np.zeros((4, 8, 8, 1), np.uint8), aug, (0.5,),
                              (0.5,))
    assert gray.shape == (4, 8, 8, 1)
