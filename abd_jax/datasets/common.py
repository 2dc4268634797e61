"""What the builders share: PNG encoding of pixel arrays and the manual dir's lookup."""
import io

import numpy as np
from PIL import Image


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding (PIL's, 8 bits) of a uint8 image [H, W, C]: C = 1 is stored greyscale
    (mode "L"), C = 3 as RGB. Any PNG decoder returns `image` exactly.

    TFDS's own encoder for numpy images needs TensorFlow; an `Image` feature given bytes
    stores them as they are."""
    pixels = np.asarray(image, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buf, format="PNG")
    return buf.getvalue()


def manual_dir(dl_manager):
    """The manual dir of a TFDS download manager; FileNotFoundError (with TFDS's own
    instructions) when none was given or it does not exist."""
    try:
        return dl_manager.manual_dir
    except AssertionError as err:  # TFDS asserts that the folder exists
        raise FileNotFoundError(str(err)) from None
