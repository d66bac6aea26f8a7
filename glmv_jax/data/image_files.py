"""Image files of a record, checked before they are decoded.

`PIL.Image.open` only reads the header, so the size is known before any pixel is decoded: an image of more
than `max_pixels` pixels (DataConfig.max_image_pixels) is a bad record `image_too_large` and is never
decoded. Pillow's own decompression-bomb check (`PIL.Image.MAX_IMAGE_PIXELS`: a warning above it, an error
above twice it) fires inside `open`; both count as `image_too_large` too, so a limit above 2 x
MAX_IMAGE_PIXELS (~179 MP) has no effect unless Pillow's is raised as well. Every failure is a
`BadRecordError` naming the record (`where`).
"""

from __future__ import annotations

from typing import Any

import PIL.Image

from glmv_jax.data.records import BadRecordError

MAX_IMAGE_PIXELS = 40_000_000     # DataConfig.max_image_pixels' default: e.g. 8000 x 5000


def open_image(path: str, where: str, max_pixels: int = MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """The lazily opened image at `path` (header read, no pixels decoded), its size within `max_pixels`.
    The caller closes it (or uses it as a context manager)."""
    try:
        image = PIL.Image.open(path)
    except FileNotFoundError:
        raise BadRecordError("missing_image", where, f"image file not found: {path}") from None
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as e:
        raise BadRecordError("image_too_large", where, f"image {path}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:   # PIL.UnidentifiedImageError is an OSError
        raise BadRecordError("unreadable_image", where, f"cannot decode image {path}: {e}") from None
    try:
        check_size(image, path, where, max_pixels)
    except BadRecordError:
        image.close()
        raise
    return image


def check_size(image: PIL.Image.Image, name: Any, where: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise BadRecordError("image_too_large", where, f"image {name} is {width}x{height} = {width * height} "
                                                       f"pixels, more than data.max_image_pixels = {max_pixels}")


def load_image(ref: Any, where: str, max_pixels: int = MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """A PIL image (passed through, its size checked) or a file path -> fully decoded PIL image."""
    if isinstance(ref, PIL.Image.Image):
        check_size(ref, "(in memory)", where, max_pixels)
        return ref
    with open_image(ref, where, max_pixels) as image:
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as e:   # truncated or corrupt pixel data
            raise BadRecordError("unreadable_image", where, f"cannot decode image {ref}: {e}") from None
        return image.copy()


def check_image(ref: Any, where: str, max_pixels: int = MAX_IMAGE_PIXELS, decode: bool = False) -> None:
    """What load_image checks, without keeping the pixels; decode=False reads only the header."""
    if decode:
        load_image(ref, where, max_pixels)
    elif isinstance(ref, PIL.Image.Image):
        check_size(ref, "(in memory)", where, max_pixels)
    else:
        open_image(ref, where, max_pixels).close()
