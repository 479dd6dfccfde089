"""Reading one image file into RGB pixels, whatever the file holds.

Pillow does the decoding because images in the wild need more than `tf.io.decode_image` offers: EXIF
rotation, CMYK JPEGs, 16-bit PNGs, palette images with transparency, and a guard against decompression
bombs. Every failure becomes an `ImageReadError` with a short reason, so callers can skip the file and
report it instead of stopping.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Pillow refuses images above twice this many pixels (DecompressionBombError) and warns above it.
Image.MAX_IMAGE_PIXELS = 120_000_000
# A truncated file must fail, not be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Transparent pixels are shown on white, as image viewers and browsers do.
_BACKGROUND = (255, 255, 255)


class ImageReadError(Exception):
    """A file that cannot be used as an image; str() is a short reason for reports."""


def is_image_name(path: Path) -> bool:
    """True for files with an image extension (any case) that are not hidden."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: transparency onto white, 16-bit scaled down, CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit int) grey: scale to 8 bits instead of clipping to white.
        arr = np.asarray(img, dtype=np.uint32 if img.mode == "I" else np.uint16)
        peak = 65535 if img.mode != "I" else max(int(arr.max()), 1)
        img = Image.fromarray((arr.astype(np.float64) * (255.0 / peak)).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        img = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA") or (img.mode == "L" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode == "RGBA" or img.mode == "RGBa":
        background = Image.new("RGB", img.size, _BACKGROUND)
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def load_image(path: str | Path, size: int | None = None) -> np.ndarray:
    """Decode `path` into a uint8 RGB array, resized to `size` x `size` when given.

    EXIF orientation is applied; GIFs and other animations give their first frame. Large JPEGs are
    decoded at reduced scale first (Pillow's draft mode), which keeps huge photos fast and small in memory.

    Raises:
        ImageReadError: empty, truncated, not an image, unsupported or too large.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning, EXIF warnings
            with Image.open(path) as img:
                if size is not None and img.format == "JPEG":
                    img.draft("RGB", (size, size))
                img.seek(0)
                img.load()
                img = ImageOps.exif_transpose(img) or img
                img = to_rgb(img)
                if size is not None and img.size != (size, size):
                    img = img.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
                return np.asarray(img, dtype=np.uint8)
    except ImageReadError:
        raise
    except Image.DecompressionBombError:
        raise ImageReadError("image too large (decompression bomb guard)") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError("not an image, or an unsupported format") from None
    except OSError as exc:
        text = str(exc)
        reason = "truncated or corrupt file" if ("truncated" in text or "broken" in text or "image file" in text) \
            else f"cannot read: {text[:80]}"
        raise ImageReadError(reason) from None
    except (ValueError, SyntaxError, EOFError, IndexError, MemoryError) as exc:
        raise ImageReadError(f"corrupt image: {type(exc).__name__}: {str(exc)[:80]}") from None
