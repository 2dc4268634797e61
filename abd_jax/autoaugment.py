"""AutoAugment's CIFAR-10 policy (Cubuk et al., CVPR 2019) on device: per image, branch-free.

The PyCIL line (FeCAM, ADC, LDC, DPCR, PyCIL's FeTrIL; docs/data.md "Augmentation policies")
trains with `CIFAR10Policy` of PyCIL `utils/autoaugment.py` and `utils/ops.py` (f3509b8; the
same two files in FeCAM d2479b7): each image draws one of 25 sub-policies; each of the
sub-policy's two operations runs with its own probability, at a fixed magnitude (one of 10
bins), with a random sign for the signed ones, on a uint8 Pillow image.

Here an image is float32 `[H, W, C]` holding the integers 0..255 of that uint8 image, and every
operation returns integers again, rounded as Pillow 13 rounds (each function says how). Every
operation is computed for every image and the drawn one selected (`jnp.where` and indexing
with traced values), so the code has no data-dependent branch and runs under `jit` / `vmap`
with one key per image. The geometric operations' sampling maps depend only on the image size
and are computed on the host at trace time, in float64 or Pillow's 16.16 fixed point, as
Pillow's C code computes them, so which source pixel lands where is Pillow's exactly. Every
operation then gives Pillow's uint8 image to the last level (tests/test_autoaugment.py holds
each bin and sign against Pillow) except the shears: their bicubic interpolation runs in
float32 where Pillow's runs in double, so a pixel whose value lies within float32 round-off
of an integer can come out one level apart (about 0.05% of a sheared image's pixels).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

FILL = 128  # PyCIL's `fillcolor` for shear and translate, and Rotate's composite grey

# (p1, op1, magnitude bin 1, p2, op2, magnitude bin 2): PyCIL's `CIFAR10Policy.policies`,
# `SubPolicy(p1, operation1, magnitude_idx1, p2, operation2, magnitude_idx2)`, in its order.
CIFAR10_POLICY = (
    (0.1, "invert", 7, 0.2, "contrast", 6),
    (0.7, "rotate", 2, 0.3, "translateX", 9),
    (0.8, "sharpness", 1, 0.9, "sharpness", 3),
    (0.5, "shearY", 8, 0.7, "translateY", 9),
    (0.5, "autocontrast", 8, 0.9, "equalize", 2),
    (0.2, "shearY", 7, 0.3, "posterize", 7),
    (0.4, "color", 3, 0.6, "brightness", 7),
    (0.3, "sharpness", 9, 0.7, "brightness", 9),
    (0.6, "equalize", 5, 0.5, "equalize", 1),
    (0.6, "contrast", 7, 0.6, "sharpness", 5),
    (0.7, "color", 7, 0.5, "translateX", 8),
    (0.3, "equalize", 7, 0.4, "autocontrast", 8),
    (0.4, "translateY", 3, 0.2, "sharpness", 6),
    (0.9, "brightness", 6, 0.2, "color", 8),
    (0.5, "solarize", 2, 0.0, "invert", 3),
    (0.2, "equalize", 0, 0.6, "autocontrast", 0),
    (0.2, "equalize", 8, 0.6, "equalize", 4),
    (0.9, "color", 9, 0.6, "equalize", 6),
    (0.8, "autocontrast", 4, 0.2, "solarize", 8),
    (0.1, "brightness", 3, 0.7, "color", 0),
    (0.4, "solarize", 5, 0.9, "autocontrast", 3),
    (0.9, "translateY", 9, 0.7, "translateY", 9),
    (0.9, "autocontrast", 2, 0.8, "solarize", 3),
    (0.8, "equalize", 8, 0.1, "invert", 3),
    (0.7, "translateY", 9, 0.9, "autocontrast", 1),
)

GEOMETRIC = ("shearX", "shearY", "translateX", "translateY", "rotate")
ENHANCE = ("color", "contrast", "sharpness", "brightness")  # Pillow ImageEnhance: blends
LUT = ("posterize", "solarize", "autocontrast", "equalize", "invert")  # per-channel tables
OPS = GEOMETRIC + ENHANCE + LUT


def magnitude(op: str, level: int):
    """The magnitude of `op` at bin `level` (0..9): PyCIL `SubPolicy.ranges`, in float64 (int
    bits for posterize; unused for autocontrast, equalize and invert)."""
    ranges = dict(shearX=np.linspace(0, 0.3, 10), shearY=np.linspace(0, 0.3, 10),
                  translateX=np.linspace(0, 150 / 331, 10),
                  translateY=np.linspace(0, 150 / 331, 10), rotate=np.linspace(0, 30, 10),
                  posterize=np.round(np.linspace(8, 4, 10), 0).astype(int),
                  solarize=np.linspace(256, 0, 10))
    if op not in OPS:
        raise ValueError(f"unknown AutoAugment operation {op!r}; known: {OPS}")
    return ranges.get(op, np.linspace(0.0, 0.9, 10) if op in ENHANCE else np.zeros(10))[level]


def _rotation_matrix(angle: float, w: int, h: int) -> list:
    """Pillow's `Image.rotate(angle)` inverse matrix (output -> input) about (w / 2, h / 2)."""
    t = -math.radians(angle % 360.0)
    a = [round(math.cos(t), 15), round(math.sin(t), 15), 0.0,
         round(-math.sin(t), 15), round(math.cos(t), 15), 0.0]
    a[2] = a[0] * (-w / 2) + a[1] * (-h / 2) + a[2] + w / 2
    a[5] = a[3] * (-w / 2) + a[4] * (-h / 2) + a[5] + h / 2
    return a


def _affine(op: str, signed: float, w: int, h: int) -> list:
    """PyCIL `ops.py`'s affine data (a, b, c, d, e, f): output pixel centre (x, y) reads input
    (a x + b y + c, d x + e y + f); `signed` = magnitude * sign. Translations are
    `magnitude * size` pixels (150/331 of the size at bin 9)."""
    if op == "rotate":
        return _rotation_matrix(signed, w, h)
    return dict(shearX=[1, signed, 0, 0, 1, 0], shearY=[1, 0, 0, signed, 1, 0],
                translateX=[1, 0, signed * w, 0, 1, 0],
                translateY=[1, 0, 0, 0, 1, signed * h])[op]


def _coord(v: np.ndarray) -> np.ndarray:
    """Pillow's COORD: truncation, -1 for any negative."""
    return np.where(v < 0, -1, np.trunc(v)).astype(np.int64)


def sampling_map(op: str, signed: float, h: int, w: int) -> dict:
    """Where each output pixel of a geometric `op` reads, as Pillow 13 computes it: `col`,
    `row` (int32 [H, W]), bicubic fractions `dx`, `dy` (float32, 0 for nearest), `inside`
    (bool; outside pixels take FILL). Shears are BICUBIC (Pillow's generic transform, float64
    coordinates at pixel centres); translations and rotation are NEAREST: translations through
    Pillow's scale-affine path (float64 accumulated along rows and columns), rotation through
    its 16.16 fixed-point affine path."""
    a = _affine(op, signed, w, h)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    dx = dy = np.zeros((h, w))
    if op in ("shearX", "shearY"):
        xo = a[0] * (x + 0.5) + a[1] * (y + 0.5) + a[2]
        yo = a[3] * (x + 0.5) + a[4] * (y + 0.5) + a[5]
        inside = (xo >= 0) & (xo < w) & (yo >= 0) & (yo < h)
        col, row = np.floor(xo - 0.5), np.floor(yo - 0.5)
        dx, dy = xo - 0.5 - col, yo - 0.5 - row
    elif a[1] == 0 and a[3] == 0:
        xs = np.add.accumulate(np.r_[a[2] + a[0] * 0.5, np.full(w - 1, float(a[0]))])
        ys = np.add.accumulate(np.r_[a[5] + a[4] * 0.5, np.full(h - 1, float(a[4]))])
        col, row = np.broadcast_arrays(_coord(xs)[None], _coord(ys)[:, None])
    else:
        fix = lambda v: math.floor(v * 65536.0 + 0.5)
        a0, a1, a3, a4 = fix(a[0]), fix(a[1]), fix(a[3]), fix(a[4])
        a2, a5 = fix(a[2] + a[0] * 0.5 + a[1] * 0.5), fix(a[5] + a[3] * 0.5 + a[4] * 0.5)
        yi, xi = np.mgrid[0:h, 0:w].astype(np.int64)
        col, row = (a2 + yi * a1 + xi * a0) >> 16, (a5 + yi * a4 + xi * a3) >> 16
    if op not in ("shearX", "shearY"):
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    assert not (dx * dy).any(), "`_sample` interpolates along one axis"
    return dict(col=col.astype(np.int32), row=row.astype(np.int32), dx=dx.astype(np.float32),
                dy=dy.astype(np.float32), inside=inside)


def _identity_map(h: int, w: int) -> dict:
    row, col = np.mgrid[0:h, 0:w].astype(np.int32)
    zero = np.zeros((h, w), np.float32)
    return dict(col=col, row=row, dx=zero, dy=zero, inside=np.ones((h, w), bool))


def _cubic(v1, v2, v3, v4, d):
    """Pillow's BICUBIC (a = -1) between v2 and v3 at fraction d, evaluated as Pillow does."""
    d = d[..., None]
    p2, p3, p4 = -v1 + v3, 2 * (v1 - v2) + v3 - v4, -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def _sample(x: jax.Array, m: dict) -> jax.Array:
    """[H, W, C] resampled through a `sampling_map` (arrays for one image): Pillow's 4x4
    bicubic, taps clamped to the edge, floored into 0..255; FILL outside. A map moves a pixel
    along one axis at most (dx = 0 or dy = 0: shears), where the 4x4 bicubic is the 4-tap one
    along that axis, and is exactly nearest where dx = dy = 0."""
    h, w = x.shape[:2]
    down = (m["dy"] != 0).astype(jnp.int32)
    rows = [jnp.clip(m["row"] + k * down, 0, h - 1) for k in (-1, 0, 1, 2)]
    cols = [jnp.clip(m["col"] + k * (1 - down), 0, w - 1) for k in (-1, 0, 1, 2)]
    taps = [x[r, c] for r, c in zip(rows, cols)]
    v = jnp.clip(jnp.floor(_cubic(*taps, m["dx"] + m["dy"])), 0, 255)
    return jnp.where(m["inside"][..., None], v, float(FILL))


def _gray(xi: jax.Array) -> jax.Array:
    """int32 [H, W, C] -> Pillow's `convert("L")`, int32 [H, W]: (19595 R + 38470 G + 7471 B
    + 2^15) >> 16 (a grey image is its own)."""
    if xi.shape[-1] == 1:
        return xi[..., 0]
    return (19595 * xi[..., 0] + 38470 * xi[..., 1] + 7471 * xi[..., 2] + 0x8000) >> 16


def _smooth(xi: jax.Array) -> jax.Array:
    """Pillow's `ImageFilter.SMOOTH` ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13): interior pixels
    round(sum / 13) (no ties: sum / 13 is never k + 1/2), border pixels copied."""
    h, w = xi.shape[:2]
    box = sum(xi[i:h - 2 + i, j:w - 2 + j] for i in range(3) for j in range(3))
    return xi.at[1:-1, 1:-1].set((2 * (box + 4 * xi[1:-1, 1:-1]) + 13) // 26)


def _degenerate(xi: jax.Array) -> jax.Array:
    """The four ImageEnhance end points, float32 [4, H, W, C] in ENHANCE's order: Color's grey
    image, Contrast's flat image at int(mean grey + 0.5), Sharpness's smoothed image,
    Brightness's black."""
    gray = _gray(xi)
    n = gray.size
    mean = (2 * gray.sum() + n) // (2 * n)
    parts = (jnp.broadcast_to(gray[..., None], xi.shape), jnp.full_like(xi, mean),
             _smooth(xi), jnp.zeros_like(xi))
    return jnp.stack(parts).astype(jnp.float32)


def _autocontrast_one_lower() -> np.ndarray:
    """int32 [256, 256]: bit j of entry [lo, hi] is set where Pillow's float64 autocontrast
    table, int(v * scale + offset) (scale = 255 / (hi - lo), offset = -lo * scale), is one
    below the exact floor((v - lo) * 255 / (hi - lo)) at v = lo + j (hi - lo) / g, g =
    gcd(255, hi - lo): 12,094 of the 8.4 million entries with lo < hi. Only entries whose
    exact value is an integer can fall (the others lie at least 1/255 above one), and those
    are exactly these v, j = 0..g; every one that falls has j <= 17."""
    bits = np.zeros((256, 256), np.int64)
    for d in range(1, 256):
        g = math.gcd(255, d)
        lo, j = np.arange(256 - d)[:, None], np.arange(g + 1)[None]
        scale = 255.0 / d
        fell = np.trunc((lo + j * (d // g)) * scale + -lo * scale) < j * (255 // g)
        assert not fell[:, 31:].any()
        bits[lo[:, 0], lo[:, 0] + d] = (fell[:, :31] << j[:, :31]).sum(1)
    return bits.astype(np.int32)


def _autocontrast(flat: jax.Array) -> jax.Array:
    """Pillow's `ImageOps.autocontrast` tables, int32 [C, 256], from the pixels `flat`
    [C, N]: each channel stretched from its [lo, hi] to [0, 255], int(v * scale + offset) in
    float64 (the exact floor, less the entries `_autocontrast_one_lower` lists), clipped to
    0..255; identity when hi == lo."""
    v = jnp.arange(256, dtype=jnp.int32)
    lo, hi = flat.min(1)[:, None], flat.max(1)[:, None]
    span = jnp.maximum(hi - lo, 1)
    stride = span // jnp.gcd(span, 255)  # v - lo between integer-valued entries
    j = (v - lo) // stride
    bits = jnp.asarray(_autocontrast_one_lower())[lo, hi]
    listed = (bits >> jnp.clip(j, 0, 30)) & 1 == 1
    one_lower = ((v - lo) % stride == 0) & (j >= 0) & (j < 31) & listed
    stretch = jnp.clip((v - lo) * 255 // span - one_lower, 0, 255)
    return jnp.where(hi > lo, stretch, v)


def _tables(xi: jax.Array, posterize_mask, solarize_below) -> jax.Array:
    """The five per-channel look-up tables, int32 [5, C, 256] in LUT's order: posterize
    (v & mask), solarize (v below the threshold kept, others 255 - v), `_autocontrast`,
    equalize (Pillow's, in integers: step = (pixels - count of the top value) // 255, table
    (step // 2 + pixels below v) // step clipped to 255, identity when step == 0), invert
    (255 - v)."""
    v = jnp.arange(256, dtype=jnp.int32)
    flat = xi.reshape(-1, xi.shape[-1]).T  # [C, H * W]
    autocontrast = _autocontrast(flat)
    hist = jax.vmap(lambda c: jnp.bincount(c, length=256))(flat)
    top = jnp.take_along_axis(hist, flat.max(1)[:, None], 1)  # the last non-empty bin
    step = (flat.shape[1] - top) // 255
    below = jnp.cumsum(hist, 1) - hist
    equalize = jnp.where(step > 0, jnp.minimum((step // 2 + below) // jnp.maximum(step, 1), 255),
                         v)
    posterize = jnp.broadcast_to(v & posterize_mask, autocontrast.shape)
    solarize = jnp.broadcast_to(jnp.where(v < solarize_below, v, 255 - v), autocontrast.shape)
    invert = jnp.broadcast_to(255 - v, autocontrast.shape)
    return jnp.stack([posterize, solarize, autocontrast, equalize, invert])


def blend(d: jax.Array, x: jax.Array, factor) -> jax.Array:
    """Pillow's `Image.blend(d, x, factor)` (ImageEnhance's `enhance`) on float32 integers:
    float32 d + float32(factor * (x - d)), truncated and clipped to 0..255. The product is
    summed from two exact halves of `factor`, so that XLA's multiply-add fusion (one rounding
    where Pillow's C rounds twice) cannot change it."""
    f_hi = jax.lax.reduce_precision(factor, exponent_bits=8, mantissa_bits=11)
    diff = x - d
    return jnp.clip(jnp.floor(d + (f_hi * diff + (factor - f_hi) * diff)), 0, 255)


def _apply(x: jax.Array, p: dict, m: dict) -> jax.Array:
    """One operation on one image, float32 [H, W, C] integers -> the same; `p` holds its
    (possibly traced) parameters as `_params` builds them, `m` its sampling map. All three
    kinds are computed and the operation's selected."""
    xi = x.astype(jnp.int32)
    geometric = _sample(x, m)
    enhanced = blend(_degenerate(xi)[p["enhance"]], x, p["factor"])
    table = _tables(xi, p["posterize_mask"], p["solarize_below"])[p["lut"]]
    looked_up = table[jnp.arange(x.shape[-1]), xi].astype(jnp.float32)
    return jnp.where(p["kind"] == 0, geometric, jnp.where(p["kind"] == 1, enhanced, looked_up))


def _params(entries, h: int, w: int) -> tuple[dict, dict]:
    """Parameters of each (op, bin, sign) in `entries`, stacked over entries (numpy): `kind`
    (0 geometric, 1 enhance, 2 look-up), `enhance` and `lut` (index into ENHANCE / LUT),
    `factor` (float32(1 + magnitude * sign), as Pillow receives the blend factor),
    `posterize_mask`, `solarize_below` (ceil of the threshold: v < t for integers), `map` (an
    index into the second result, the distinct sampling maps stacked; 0 = identity)."""
    rows, maps = [], {None: _identity_map(h, w)}
    for op, level, sign in entries:
        m = magnitude(op, level)
        key = (op, float(m * sign)) if op in GEOMETRIC else None
        if key not in maps:
            maps[key] = sampling_map(op, m * sign, h, w)
        rows.append(dict(
            kind=0 if op in GEOMETRIC else 1 if op in ENHANCE else 2,
            enhance=ENHANCE.index(op) if op in ENHANCE else 0,
            lut=LUT.index(op) if op in LUT else 0,
            factor=np.float32(1 + m * sign) if op in ENHANCE else np.float32(1),
            posterize_mask=~(2 ** (8 - int(m)) - 1) & 255 if op == "posterize" else 255,
            solarize_below=math.ceil(m) if op == "solarize" else 256,
            map=list(maps).index(key)))
    params = {k: np.asarray([r[k] for r in rows]) for k in rows[0]}
    return params, {k: np.stack([m[k] for m in maps.values()]) for k in maps[None]}


def _run(x: jax.Array, params: dict, maps: dict, i) -> jax.Array:
    """`x` through entry `i` (may be traced) of `_params`' tables."""
    p = {k: jnp.asarray(v)[i] for k, v in params.items()}
    return _apply(x, p, {k: jnp.asarray(v)[p["map"]] for k, v in maps.items()})


def apply_op(x: jax.Array, op, level, sign=1) -> jax.Array:
    """Operation `op` (a name in OPS, or its index there) at magnitude bin `level` (0..9) with
    `sign` (+1 / -1; read by the signed operations) on float32 [H, W, C] integers 0..255,
    through the code `cifar10_policy` runs. `level` and `sign`, and `op` as an index, may be
    traced (the tables then hold every operation)."""
    ops = (op,) if isinstance(op, str) else OPS
    entries = [(o, lv, sg) for o in ops for lv in range(10) for sg in (-1, 1)]
    params, maps = _params(entries, *x.shape[:2])
    first = 0 if isinstance(op, str) else 20 * op
    return _run(x, params, maps, first + 2 * level + (sign > 0))


def policy_draws(key: jax.Array) -> dict:
    """One image's draws: `sub_policy` (uniform over the 25), `apply` bool [2] (each operation
    with its probability, as `random.random() < p`), `sign` int32 [2] (+1 / -1 each, PyCIL's
    `random.choice([-1, 1])`; unused by unsigned operations)."""
    k_row, k_apply, k_sign = jax.random.split(key, 3)
    row = jax.random.randint(k_row, (), 0, len(CIFAR10_POLICY))
    prob = jnp.asarray([(p1, p2) for p1, _, _, p2, _, _ in CIFAR10_POLICY], jnp.float32)[row]
    return dict(sub_policy=row, apply=jax.random.uniform(k_apply, (2,)) < prob,
                sign=jnp.where(jax.random.bernoulli(k_sign, shape=(2,)), 1, -1))


def cifar10_policy(x: jax.Array, draws: dict) -> jax.Array:
    """PyCIL's `CIFAR10Policy` on one image, float32 [H, W, C] integers 0..255 -> the same:
    sub-policy `draws["sub_policy"]`'s first operation if `apply[0]`, then its second if
    `apply[1]`, each with its sign."""
    entries = [(op, level, sign) for p1, op1, m1, p2, op2, m2 in CIFAR10_POLICY
               for op, level in ((op1, m1), (op2, m2)) for sign in (-1, 1)]
    params, maps = _params(entries, *x.shape[:2])  # entry 4 row + 2 slot + (sign > 0)
    for slot in range(2):
        i = 4 * draws["sub_policy"] + 2 * slot + (draws["sign"][slot] > 0)
        x = jnp.where(draws["apply"][slot], _run(x, params, maps, i), x)
    return x
