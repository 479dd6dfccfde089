"""A folder salted with every kind of broken and odd-but-valid image file, for data-check and loading tests.

Each odd file has a known colour at its top-left corner (after EXIF rotation and compositing), so tests can
check decoded pixels, not just that decoding did not fail.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED = (220, 30, 30)
BLUE = (30, 30, 220)
WHITE = (255, 255, 255)


def textured(seed: int, size: int = 64) -> np.ndarray:
    """A smooth random RGB picture: structured enough that perceptual hashes of different seeds differ."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` (a decompression bomb's shape) with one tiny data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _save_bytes(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def write_odd_files(folder: Path) -> dict[str, tuple]:
    """Odd-but-valid images in `folder`; returns {file name: expected RGB at the top-left corner}."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}

    # RGBA with a transparent corner: transparency shows as white.
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = RED
    rgba[..., 3] = 255
    rgba[:10, :10, 3] = 0
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    expected["alpha.png"] = WHITE

    # Palette PNG whose index 0 is transparent, used at the corner.
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 0] + list(RED) + [0] * (254 * 3))
    pal.paste(0, (0, 0, 10, 10))
    pal.save(folder / "palette_transparent.png", transparency=0)
    expected["palette_transparent.png"] = WHITE

    Image.new("L", (40, 40), 90).save(folder / "grey.png")
    expected["grey.png"] = (90, 90, 90)

    # CMYK JPEG of pure red: must come out red, not cyan or inverted.
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)
    expected["cmyk.jpg"] = (255, 0, 0)

    # 16-bit grey PNG at mid grey (32768 of 65535) must give 128, not white.
    Image.fromarray(np.full((40, 40), 32768, np.uint16)).save(folder / "grey16.png")
    expected["grey16.png"] = (128, 128, 128)

    # EXIF orientation 6 (stored rotated: viewers turn it 90 degrees clockwise), 60 wide and 40 high as stored. Red at the
    # stored bottom-left corner, which after the rotation is the top-left corner.
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[...] = BLUE
    stored[-10:, :10] = RED
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    expected["exif_rotated.jpg"] = RED

    Image.new("RGB", (40, 40), RED).save(folder / "bitmap.bmp")
    expected["bitmap.bmp"] = RED
    Image.new("RGB", (40, 40), RED).save(folder / "photo.webp", lossless=True)
    expected["photo.webp"] = RED
    Image.new("RGB", (40, 40), RED).save(folder / "scan.tiff")
    expected["scan.tiff"] = RED
    # Animated GIF: the first frame (red) is the one used.
    frames = []
    for index in (0, 1):
        frame = Image.new("P", (40, 40), index)
        frame.putpalette(list(RED) + list(BLUE) + [0] * (254 * 3))
        frames.append(frame)
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    expected["anim.gif"] = RED
    Image.new("RGB", (40, 40), RED).save(folder / "UPPER.JPG", quality=95)
    expected["UPPER.JPG"] = RED
    Image.new("RGB", (1, 1), RED).save(folder / "tiny.png")
    expected["tiny.png"] = RED
    return expected


#: broken file name -> the reason kind `tltool.images.ImageReadError.kind` gives for it
BROKEN_KINDS = {
    "empty.jpg": "empty",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "text.jpg": "not_image",
    "heic_inside.jpg": "unsupported",
    "bomb.png": "too_large",
    "garbled.jpg": "corrupt",
    "bad_header.png": "corrupt",
}


def write_broken_files(folder: Path) -> None:
    """One file per kind of broken image in BROKEN_KINDS."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    photo = Image.fromarray(textured(99, 128))
    jpg = _save_bytes(photo, "JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    png = _save_bytes(photo, "PNG")
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "text.jpg").write_text("this is a text file, not a picture\n")
    # An iPhone HEIC photo renamed to .jpg: a real image format Pillow cannot read.
    (folder / "heic_inside.jpg").write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64)
    (folder / "bomb.png").write_bytes(_png_header_only(30000, 30000))
    # Complete files with damage inside: zeroed bytes in a JPEG's compressed data, a PNG chunk header.
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    garbled = bytearray(_save_bytes(Image.fromarray(noisy), "JPEG", quality=90))
    garbled[400:420] = bytes(20)
    (folder / "garbled.jpg").write_bytes(bytes(garbled))
    bad_header = bytearray(png)
    bad_header[40] ^= 0xFF
    (folder / "bad_header.png").write_bytes(bytes(bad_header))


def make_salted_folder(root: Path, per_class: int = 6) -> Path:
    """A training folder: classes `red` and `blue` of textured images, salted with every odd and broken kind.

    Layout: red/ holds the odd-but-valid files and the broken ones, blue/ holds clean images plus an exact
    duplicate, `empty_class/` holds only a broken file, and there are hidden files and a stray text file.
    """
    rng_seed = 0
    for name in ("red", "blue"):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng_seed += 1
            pixels = textured(rng_seed).astype(np.int16)
            tint = np.array(RED if name == "red" else BLUE, np.int16)
            pixels = ((pixels + tint) // 2).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i:02d}.png")
    write_odd_files(root / "red")
    write_broken_files(root / "red")
    (root / "blue" / "blue_dup.png").write_bytes((root / "blue" / "blue_00.png").read_bytes())
    (root / "empty_class").mkdir()
    (root / "empty_class" / "zero.png").write_bytes(b"")
    (root / "blue" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "blue" / "._blue_00.png").write_bytes(b"\0\5\26\7")
    (root / "blue" / "notes.txt").write_text("shot on a sunny day\n")
    return root
