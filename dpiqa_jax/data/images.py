"""SPEC.md's preprocessing: any image file -> (size, size, 3) float32 in [0, 1].

The authors open each file with PIL, convert it to RGB and apply torchvision's `Resize((512, 512))`,
which on a PIL image is `Image.resize(..., BILINEAR)` (antialiased: the triangle filter widens with
the downscale factor), then `ToTensor` (uint8 / 255). `load_image` computes exactly that for plain
RGB files, and also reads what their `convert('RGB')` gets wrong or cannot read; see `load_image`.
"""
import io
import os
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dpiqa_jax.errors import UserError

# The formats PIL may open: photos and the datasets' files (JPEG includes phones' MPO). Others
# (TGA, ICO, EPS, which would start Ghostscript, ...) are refused as unsupported, which also keeps
# PIL's rarer decoders away from untrusted files.
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")
MAX_PIXELS = 1 << 26  # 67 M: a 50-megapixel phone photo passes, a decompression bomb does not.
DRAFT_MARGIN = 2  # JPEG draft decoding keeps every side >= 2x the target (see load_image).
_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees

ImageSource = Union[str, os.PathLike, bytes]


class ImageError(UserError, ValueError):
    """An image that cannot be read: the one-line message names the file and the reason."""


def load_image(source: ImageSource, size: int = 512, *, name: Optional[str] = None, draft: bool = True,
               exif: bool = True, max_pixels: int = MAX_PIXELS, dtype=np.float32) -> np.ndarray:
    """Read an image file (path or encoded bytes) as a float32 (size, size, 3) array in [0, 1].
    `dtype=np.uint8` returns the levels 0-255 before the division by 255 instead (the input
    pipeline ships those to the devices: a quarter of the bytes; see `pipeline.to_global`).

    Steps: decode the first frame (animations), apply the EXIF orientation (`exif=False` keeps the
    stored orientation, as the authors' PIL loading does), convert to RGB, resize to size x size
    with PIL's antialiased bilinear filter, divide by 255. Conversions to RGB: transparent images
    (RGBA, LA, palette or grey with a transparent colour) are composited on white; 16-bit grey is
    scaled to 8 bits (v / 257, rounded) rather than clipped as PIL's `convert` does; 16-bit RGB is
    reduced by PIL to its high byte; float images are taken as [0, 1]; CMYK and YCbCr go through PIL.

    Draft decoding (`draft=True`): a JPEG at least 4x the target on each side is decoded by libjpeg
    at 1/2, 1/4 or 1/8 scale (DCT scaling), never below 2x the target, then resized as above. This
    cuts the decode time and the memory of a 12-megapixel photo about 4-fold; the result differs
    from the full decode by about 0.2/255 on average and at most a few levels (tests bound it by
    0.5/255 and 6/255). Images under 4x the target (KonIQ, CLIVE, FLIVE) are decoded in full, so
    their result is unchanged. `draft=False` always decodes in full.

    Raises ImageError for a missing, corrupt or truncated file, a format not in FORMATS, and an
    image of more than `max_pixels` pixels (checked from the header, before decoding).
    """
    name = name or (os.fspath(source) if not isinstance(source, bytes) else "<bytes>")
    image = _open(source, name)
    try:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"{name}: {width}x{height} image has more than the {max_pixels} pixels allowed")
        scale = _draft(image, size) if draft else 1
        _decode(image, name)
        image, swapped = _orient(image, exif)
        if swapped:
            width, height = height, width
        rgb = _to_rgb(image, name)
        box = (0, 0, width / scale, height / scale) if scale > 1 else None
        levels = np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR, box=box))
        return levels if np.dtype(dtype) == np.uint8 else levels.astype(np.float32) / np.float32(255)
    finally:
        image.close()


def _open(source: ImageSource, name: str) -> Image.Image:
    try:
        Image.init()  # registers every plugin, so that FORMATS all resolve (idempotent)
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=FORMATS)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: unknown or unsupported image format (accepted: "
                         f"{', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: too many pixels ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: {_reason(e, 'corrupt image header')} ({_one_line(e)})") from None


def _draft(image: Image.Image, size: int) -> int:
    """Ask libjpeg for a reduced decode; returns the scale it will decode at (1 if none)."""
    if image.format not in ("JPEG", "MPO"):
        return 1
    full_width = image.size[0]
    if image.draft(None, (DRAFT_MARGIN * size, DRAFT_MARGIN * size)) is None:
        return 1
    return round(full_width / image.size[0]) if image.size[0] != full_width else 1


def _decode(image: Image.Image, name: str) -> None:
    try:
        image.load()
    except OSError as e:
        raise ImageError(f"{name}: {_reason(e, 'corrupt image data')} ({_one_line(e)})") from None
    except (SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name}: corrupt image data ({_one_line(e)})") from None


def _orient(image: Image.Image, exif: bool) -> tuple[Image.Image, bool]:
    if not exif:
        return image, False
    orientation = image.getexif().get(_ORIENTATION, 1)
    return ImageOps.exif_transpose(image), orientation in _SWAPPING_ORIENTATIONS


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    if image.mode == "I" or image.mode.startswith("I;16"):
        levels = np.rint(np.asarray(image, dtype=np.float64) / 257.0)
        image = Image.fromarray(np.clip(levels, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        levels = np.rint(np.asarray(image, dtype=np.float64) * 255.0)
        image = Image.fromarray(np.clip(levels, 0, 255).astype(np.uint8))
    if "A" in image.mode or "a" in image.mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ImageError(f"{name}: cannot convert {image.mode} image to RGB ({_one_line(e)})") from None


def _reason(error: Exception, otherwise: str) -> str:
    return "truncated file" if "truncated" in str(error).lower() else otherwise


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
