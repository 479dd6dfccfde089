"""Reading one image file into RGB pixels, whatever the file holds.

Pillow does the decoding because images in the wild need more than `tf.io.decode_image` offers: EXIF
rotation, CMYK JPEGs, 16-bit PNGs, palette images with transparency, and a guard against decompression
bombs. Every failure becomes an `ImageReadError` with a short reason and a kind, so callers can skip the
file and report it instead of stopping; no other exception escapes `load_image` for a bad file.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Pillow refuses images above twice this many pixels (DecompressionBombError) and warns above it; tltool
# refuses them already above it (see `_check_pixels`), whatever the format.
Image.MAX_IMAGE_PIXELS = 120_000_000
# A truncated file must fail, not be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pillow's own warnings (decompression bomb, corrupt EXIF, palette transparency) are noise here: tltool
# reports unusable files itself. A filter set once, because `warnings.catch_warnings` is not thread-safe:
# decoding threads entering and leaving it can leave the process's warning filters scrambled.
warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Image formats tltool does not read: files with these extensions are reported, not silently ignored.
UNSUPPORTED_EXTENSIONS = frozenset({".heic", ".heif", ".avif", ".jxl", ".svg", ".psd", ".raw", ".cr2", ".cr3",
                                    ".nef", ".arw", ".dng", ".orf", ".rw2", ".jp2", ".ico", ".pdf", ".eps"})

# Transparent pixels are shown on white, as image viewers and browsers do.
_BACKGROUND = (255, 255, 255)
FILE_NOT_FOUND = "file not found (a dangling link, or deleted while reading)"



def io_workers() -> int:
    """Threads that read image files at once: reading is I/O bound, and Pillow releases the GIL."""
    return min(32, (os.cpu_count() or 1) + 4)


class ImageReadError(Exception):
    """A file that cannot be used as an image; str() is a short reason for reports, `kind` its category."""

    def __init__(self, reason: str, kind: str = "corrupt"):
        super().__init__(reason)
        self.kind = kind


def is_image_name(path: Path) -> bool:
    """True for files with an image extension (any case) that are not hidden."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def sniff_unsupported(head: bytes) -> str | None:
    """The name of a known image format Pillow cannot read, from a file's first bytes, else None."""
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIC"
        if brand in (b"avif", b"avis"):
            return "AVIF"
        return "ISO media (video?)"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\0\0\0\x0cJXL "):
        return "JPEG XL"
    if head.startswith(b"%PDF"):
        return "PDF"
    stripped = head.lstrip()
    if stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and b"<svg" in head):
        return "SVG"
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: transparency onto white, 16-bit scaled down, CMYK converted."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img)
        peak = int(arr.max()) if arr.size else 0
        if img.mode == "I" and peak > 65535:
            # Genuine 32-bit data (rare, scientific TIFFs): stretch to the range used.
            lo = int(arr.min())
            scaled = _by_rows(arr, lambda rows: (rows.astype(np.int64) - lo) * 255 // max(peak - lo, 1))
        else:
            # 16-bit: the standard 65535 -> 255 mapping (divide by 257, rounded), so mid grey stays mid grey.
            scaled = _by_rows(arr, lambda rows: (np.clip(rows.astype(np.int64), 0, 65535) + 128) // 257)
        img = Image.fromarray(scaled, "L")
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32))
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0.0 and hi <= 1.0:  # the usual convention for float images: 0..1
            lo, hi = 0.0, 1.0
        img = Image.fromarray(np.round((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA", "La") or (img.mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", img.size, _BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


#: Pixels converted at a time from 16- and 32-bit images: the int64 arithmetic then needs a few MB, not
#: eight bytes for every pixel of a 120-megapixel scan (per decoding thread).
_CONVERT_PIXELS = 1 << 20


def _by_rows(arr: np.ndarray, convert) -> np.ndarray:
    """`convert` applied to strips of rows of a 2-D array, into one uint8 array."""
    out = np.empty(arr.shape, np.uint8)
    step = max(1, _CONVERT_PIXELS // max(1, arr.shape[1]))
    for start in range(0, arr.shape[0], step):
        out[start:start + step] = convert(arr[start:start + step])
    return out


def _check_pixels(img: Image.Image) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.size[0] * img.size[1] > limit:
        raise ImageReadError(f"image too large ({img.size[0]}x{img.size[1]} px; the decompression-bomb guard "
                             f"allows {limit:,} px)", "too_large")


def _facts(img: Image.Image) -> dict:
    """What is unusual about an opened (not yet decoded) image, for data check's report."""
    try:
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # malformed EXIF is ignored, as when decoding
        orientation = 1
    return {"format": img.format, "mode": img.mode, "width": img.size[0], "height": img.size[1],
            "frames": int(getattr(img, "n_frames", 1) or 1), "orientation": orientation,
            "transparency": img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info}


def decode(source, size: int | None = None, facts: dict | None = None) -> Image.Image:
    """Decode a path or bytes into an RGB Pillow image, resized to `size` x `size` when given.

    EXIF orientation is applied; GIFs and other animations give their first frame. Large JPEGs are
    decoded at reduced scale first (Pillow's draft mode), which keeps huge photos fast and small in memory.

    Args:
        source: a path, or the file's bytes.
        size: square output size, or None for the original size.
        facts: if given, filled with format, mode, width, height, frames, orientation and transparency
            of the file as stored.

    Raises:
        ImageReadError: empty, truncated, not an image, unsupported format, too large, or corrupt.
    """
    data = source if isinstance(source, (bytes, bytearray)) else None
    try:
        if data is not None:
            if not data:
                raise ImageReadError("empty file (0 bytes)", "empty")
            handle = io.BytesIO(data)
        else:
            if os.stat(source).st_size == 0:
                raise ImageReadError("empty file (0 bytes)", "empty")
            handle = source
        with Image.open(handle) as img:
            _check_pixels(img)
            if facts is not None:
                facts.update(_facts(img))
            if size is not None and img.format == "JPEG":
                img.draft("RGB", (size, size))
            img.seek(0)
            img.load()
            try:
                img = ImageOps.exif_transpose(img) or img
            except Exception:  # malformed EXIF: keep the stored orientation rather than lose the image
                pass
            img = to_rgb(img)
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
            return img
    except ImageReadError:
        raise
    except Image.DecompressionBombError:
        raise ImageReadError("image too large (decompression-bomb guard)", "too_large") from None
    except Image.UnidentifiedImageError:
        raise _unidentified(data if data is not None else source) from None
    except FileNotFoundError:
        raise ImageReadError(FILE_NOT_FOUND, "unreadable") from None
    except PermissionError:
        raise ImageReadError("permission denied", "unreadable") from None
    except (OSError, SyntaxError, EOFError) as exc:
        raise _damaged(exc) from None
    except MemoryError:
        raise ImageReadError("image too large to decode in memory", "too_large") from None
    except Exception as exc:  # a Pillow plugin tripping over bad data: still just a broken file
        raise ImageReadError(f"corrupt image: {type(exc).__name__}: {str(exc)[:80]}", "corrupt") from None


def _damaged(exc: BaseException) -> ImageReadError:
    text = str(exc).lower()
    if isinstance(exc, EOFError) or any(w in text for w in ("truncated", "premature end", "end of file",
                                                           "unexpected end", "broken png")):
        return ImageReadError("truncated file", "truncated")
    if "broken data stream" in text:
        return ImageReadError("corrupt image data", "corrupt")
    return ImageReadError(f"corrupt image: {str(exc)[:80]}", "corrupt")


# Signatures of formats Pillow reads: a file that starts like one but does not open is corrupt, not "not an image".
_SIGNATURES = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
               (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"), (b"RIFF", "WebP"))


def _unidentified(source) -> ImageReadError:
    if isinstance(source, (bytes, bytearray)):
        head = bytes(source[:64])
    else:
        with open(source, "rb") as handle:
            head = handle.read(64)
    fmt = sniff_unsupported(head)
    if fmt:
        return ImageReadError(f"unsupported format ({fmt}); convert it to JPEG or PNG", "unsupported")
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return ImageReadError(f"corrupt {name} header", "corrupt")
    return ImageReadError("not an image (unrecognised content)", "not_image")


def probe(path: str | Path) -> None:
    """Check cheaply (header only) that `path` opens as an image within the size guard.

    Raises:
        ImageReadError: as `decode`, except that damage inside compressed data (a truncated JPEG, say) is
            only found when decoding.
    """
    try:
        if os.stat(path).st_size == 0:
            raise ImageReadError("empty file (0 bytes)", "empty")
        with Image.open(path) as img:
            _check_pixels(img)
            if img.format == "PNG":
                img.verify()  # walks the chunks and their checksums: finds truncated PNGs without decoding
    except ImageReadError:
        raise
    except Image.DecompressionBombError:
        raise ImageReadError("image too large (decompression-bomb guard)", "too_large") from None
    except Image.UnidentifiedImageError:
        raise _unidentified(path) from None
    except PermissionError:
        raise ImageReadError("permission denied", "unreadable") from None
    except FileNotFoundError:
        raise ImageReadError(FILE_NOT_FOUND, "unreadable") from None
    except (OSError, SyntaxError, EOFError) as exc:
        raise _damaged(exc) from None
    except Exception as exc:
        raise ImageReadError(f"corrupt image: {str(exc)[:80]}", "corrupt") from None


def load_image(path: str | Path, size: int | None = None) -> np.ndarray:
    """Decode `path` into a uint8 RGB array of shape (H, W, 3), resized to `size` x `size` when given.

    EXIF orientation is applied, transparency composited onto white, 16-bit scaled to 8 bits, CMYK and
    palette images converted, and animations give their first frame.

    Raises:
        ImageReadError: empty, truncated, not an image, unsupported format, too large, or corrupt.
    """
    return np.asarray(decode(Path(path), size), dtype=np.uint8)
