"""The one image decoder: encoded bytes -> uint8 (C, H, W), every failure a Python exception.

Training views, feature extraction, the online monitor and `vitrail shard --decode` all
decode here, through Pillow. torchvision's `decode_image` is not used: its PNG path
segfaults the process on any libpng error (a flipped byte in the image data, image data
that stops short, a header larger than its data), and it allocates whatever size a JPEG
header claims. Pillow raises on each, and `Image.open` parses only the header, so the
pixel limit is checked before any pixel buffer exists.

Cost, measured on a loaded 2-core machine (best of 5, one thread, indicative): a 28 x 28 grey
PNG 41 us with torchvision, 89 us here (Pillow's per-image Python overhead); a 448 x 448 RGB
JPEG 562 us against 844 us. The image comes back with channels-last strides, which the view
recipes need anyway (`augment.channels_last` no longer copies), and decoding is about a tenth
of a view task's time (BENCHMARKS.md), so the views slow by a few percent at most.
"""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image

# Pillow's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS), the default of data.max_image_pixels.
MAX_IMAGE_PIXELS = 89_478_485
# The formats shards hold (shards.IMAGE_EXTENSIONS); no other Pillow plugin ever parses a sample.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "PPM")
_MODES = {1: "L", 3: "RGB"}
# Our own limit decides and is reported per image; Pillow's warning would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class UndecodableImage(ValueError):
    """Bytes that are no image of a known format, a damaged one, or one over the pixel limit."""


def decode(data: bytes, channels: int, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Encoded image bytes -> (channels, H, W) uint8 with channels-last strides (what the view
    recipes resize fastest; no copy to make); raises UndecodableImage saying why."""
    image = _decoded(data, _MODES[channels], max_pixels)
    width, height = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)  # one copy, writable
    return pixels.view(height, width, channels).permute(2, 0, 1)


def check(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Raise UndecodableImage unless `data` decodes whole, in its own mode, within `max_pixels`."""
    _decoded(data, None, max_pixels)


def _decoded(data: bytes, mode: str | None, max_pixels: int) -> Image.Image:
    """`data` decoded whole (and converted to `mode` unless None), or UndecodableImage."""
    if max_pixels > Image.MAX_IMAGE_PIXELS:
        # Pillow refuses images over twice its limit inside Image.open, before we could look:
        # a user who allows larger images raises it (in this process) to theirs.
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise UndecodableImage(f"{width}x{height} pixels exceed data.max_image_pixels ({max_pixels:,})")
            if not width * height:
                raise UndecodableImage(f"{width}x{height} pixels: an empty image")
            image.load()
            return image if mode in (None, image.mode) else image.convert(mode)
    except UndecodableImage:
        raise
    except Image.DecompressionBombError as error:  # over twice Pillow's limit, so over ours as well
        raise UndecodableImage(f"more pixels than data.max_image_pixels ({max_pixels:,}): {error}") from None
    except Exception as error:  # noqa: BLE001 - codecs fed hostile bytes raise OSError, SyntaxError,
        # struct.error, IndexError...; each one means this image is unusable, never that the run is.
        raise UndecodableImage(f"{type(error).__name__}: {error}") from None
