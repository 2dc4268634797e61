"""The files of a folder dataset, `root/{train,test}/<class>/<image>`, and the reading of one.

Every problem is one line naming the file or folder and the fix: a ValueError, or a
FileNotFoundError for a missing train/ or test/ folder.

Read: the class folders directly inside train/ and test/, and in each the files with an image
suffix (`IMAGE_SUFFIXES`). Skipped without a word: names starting with "." (.DS_Store, macOS's
`._<name>.jpg` companions, .ipynb_checkpoints), files with other suffixes (notes.txt) and
folders inside class folders. Refused: a file with an image suffix that PIL cannot read
(`read_image`), a link that leads out of root, a class folder without images, in train/ or
in test/ (every class's accuracy is measured on its test images), and a test/ class that
train/ lacks.
"""
import pathlib
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
GREY_MODES = ("1", "L", "I", "I;16", "F")  # PIL modes read as one channel
SPLITS = ("train", "test")
_KINDS = "PNG, JPEG, BMP, GIF, WebP or TIFF files"


def _and_more(names: list) -> str:
    """' (and 2 more: b, c)' for the names after the first one of a list of offenders."""
    rest = [str(n) for n in names[1:]]
    if not rest:
        return ""
    return f" (and {len(rest)} more: {', '.join(rest[:3])}{', ...' if len(rest) > 3 else ''})"


def _inside(path: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
    """`path`, refused when it is a link that resolves outside `root`. A folder dataset is what
    lies under its root: prepared once, it is known by that path alone."""
    if path.is_symlink() and not path.resolve().is_relative_to(root):
        raise ValueError(f"{path} is a link to {path.resolve()}, outside the dataset folder "
                         f"{root}; copy what it points to into {root} instead (links must "
                         "stay inside the folder)")
    return path


def _visible(folder: pathlib.Path) -> list[pathlib.Path]:
    """The entries of `folder` whose names do not start with ".", sorted."""
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as err:  # e.g. no permission to list it
        raise ValueError(f"{folder} cannot be listed ({err.strerror or err})") from None


def class_folders(root: pathlib.Path, split: str) -> dict[str, pathlib.Path]:
    """{class name: folder} of `root/split` (which must exist)."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"{split_dir} is not a folder; a folder dataset needs root/train/<class>/* and "
            f"root/test/<class>/* (class = sub-folder name, images: {_KINDS})")
    _inside(split_dir, root)
    return {p.name: _inside(p, root) for p in _visible(split_dir) if p.is_dir()}


def image_files(folder: pathlib.Path, root: pathlib.Path) -> list[pathlib.Path]:
    """The files with an image suffix directly inside `folder`, sorted. (A broken link is
    kept: reading it names it.)"""
    return [_inside(p, root) for p in _visible(folder)
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()]


def folder_layout(root: pathlib.Path) -> tuple[list[str], dict[str, list]]:
    """(class names sorted, {split: [(image path, label), ...]}) of `root/{train,test}/<class>/*`,
    classes and then file names in sorted order; checks the layout (see the module
    docstring) without reading any image."""
    root = pathlib.Path(root).resolve()
    folders = {split: class_folders(root, split) for split in SPLITS}
    classes = sorted(folders["train"])
    if not classes:
        raise ValueError(f"{root / 'train'} has no class folders; put each class's training "
                         "images in root/train/<class>/ and its test images in root/test/<class>/")
    extra = sorted(set(folders["test"]) - set(classes))
    if extra:
        raise ValueError(
            f"{folders['test'][extra[0]]} is a class that {root / 'train'} lacks"
            f"{_and_more(extra)}; add its training images as {root / 'train' / extra[0]}/, "
            "or remove it from test/")
    files = {}
    for split in SPLITS:
        per_class = [image_files(folders[split][name], root) if name in folders[split] else []
                     for name in classes]
        _check_not_empty(root / split, [c for c, f in zip(classes, per_class) if not f],
                         folders[split])
        files[split] = [(path, label) for label, paths in enumerate(per_class)
                        for path in paths]
    return classes, files


def _check_not_empty(split_dir: pathlib.Path, empty: list[str], existing: dict) -> None:
    """Refuses the classes in `empty` (names of classes without images in `split_dir`)."""
    if not empty:
        return
    folder = split_dir / empty[0]
    if split_dir.name == "train":
        raise ValueError(f"{folder} holds no images ({_KINDS} directly inside it; folders "
                         f"inside it are not read){_and_more(empty)}; add some, or remove it")
    state = "holds no images" if empty[0] in existing else "does not exist"
    raise ValueError(f"{folder} {state}{_and_more(empty)}; every class needs test images (its "
                     "accuracy is measured on them): add some, or remove the class from train/")


def read_image(path: pathlib.Path, image_size: int = 0, channels: int = 0) -> np.ndarray:
    """uint8 [H, W, C] of the image file `path`, resized (bilinear) to image_size x
    image_size when image_size > 0. C = `channels` (1: grey, 3: RGB); 0 takes the file's:
    1 for a grey image, else 3. A file PIL cannot read (not an image, truncated, corrupt) or
    one over PIL's pixel limit is a ValueError naming it."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                channels = channels or (1 if image.mode in GREY_MODES else 3)
                image = image.convert("L" if channels == 1 else "RGB")
                if image_size:
                    image = image.resize((image_size, image_size), Image.BILINEAR)
                pixels = np.asarray(image, np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{path} is refused as a possible decompression bomb ({err}); shrink "
                         f"it to at most {Image.MAX_IMAGE_PIXELS} pixels (PIL's limit, "
                         "PIL.Image.MAX_IMAGE_PIXELS), or delete it") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        detail = ("PIL recognises no image format in it" if isinstance(err, UnidentifiedImageError)
                  else " ".join(f"{type(err).__name__}: {err}".split()))
        raise ValueError(f"{path} cannot be read as an image ({detail}): not an image, or "
                         "truncated or corrupt; replace or delete it (only files with an image "
                         "suffix are read)") from None
    return pixels[..., None] if channels == 1 else pixels
