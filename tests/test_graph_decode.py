"""The SavedModel's in-graph decoding sees the pixels `load_image` (Pillow) sees, EXIF orientation included."""

import numpy as np
import pytest
from PIL import Image

from tltool.exporting.graph_decode import decode_like_pillow, exif_orientation
from tltool.data.images import load_image


def asymmetric_picture():
    """60 wide, 40 high, four different quadrant colours: every turn and mirror gives other pixels."""
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:20, :30] = (220, 30, 30)
    pixels[:20, 30:] = (30, 200, 40)
    pixels[20:, :30] = (40, 50, 210)
    pixels[20:, 30:] = (230, 220, 40)
    return pixels


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_orientation_matches_pillow(tmp_path, orientation):
    import tensorflow as tf

    path = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(asymmetric_picture()).save(path, exif=exif, quality=95)
    encoded = tf.constant(path.read_bytes())
    assert int(exif_orientation(encoded)) == orientation
    in_graph = decode_like_pillow(encoded, 24).numpy().astype(int)
    pillow = load_image(path, 24).astype(int)
    # Same pixels up to JPEG decoder and resampling rounding; a wrong turn would differ by ~150 on average.
    assert np.abs(in_graph - pillow).mean() < 4, orientation


@pytest.mark.parametrize("width, height", [(640, 480), (300, 1000), (2000, 1500)])
def test_large_jpegs_are_decoded_at_the_reduced_scale_pillow_drafts(tmp_path, width, height):
    """Pillow decodes a JPEG at 1/2, 1/4 or 1/8 scale when the target is that much smaller; a full-size
    decode resized in one step differs by several levels on average, and by up to ~100 at edges."""
    import tensorflow as tf

    path = tmp_path / f"{width}x{height}.jpg"
    rng = np.random.default_rng(0)
    detail = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)  # blocks of 8: sharp edges
    Image.fromarray(np.kron(detail, np.ones((8, 8, 1), np.uint8))).save(path, quality=90)
    in_graph = decode_like_pillow(tf.constant(path.read_bytes()), 64).numpy().astype(int)
    difference = np.abs(in_graph - load_image(path, 64).astype(int))
    assert difference.mean() < 0.5 and difference.max() <= 3, (difference.mean(), difference.max())


def test_files_without_exif_or_with_odd_headers_read_as_upright(tmp_path):
    import tensorflow as tf

    plain = tmp_path / "plain.jpg"
    Image.fromarray(asymmetric_picture()).save(plain)
    png = tmp_path / "plain.png"
    Image.fromarray(asymmetric_picture()).save(png)
    for data in (plain.read_bytes(), png.read_bytes(), plain.read_bytes()[:30], b"", b"\xff\xd8\xff\xe1\xff\xff"):
        assert int(exif_orientation(tf.constant(data))) == 1


@pytest.mark.parametrize("orientation", [3, 6])
def test_big_endian_exif(tmp_path, orientation):
    import struct

    import tensorflow as tf

    # "MM" TIFF header, IFD0 at offset 8 with one SHORT entry: the orientation.
    raw = b"Exif\0\0" + b"MM\0*" + struct.pack(">I", 8) + struct.pack(">H", 1) \
        + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    path = tmp_path / "mm.jpg"
    Image.fromarray(asymmetric_picture()).save(path, exif=raw, quality=95)
    encoded = tf.constant(path.read_bytes())
    assert int(exif_orientation(encoded)) == orientation
    assert np.abs(decode_like_pillow(encoded, 24).numpy().astype(int) - load_image(path, 24).astype(int)).mean() < 4


@pytest.mark.parametrize("fmt, options", [("JPEG", {}), ("PNG", {}), ("GIF", {}), ("BMP", {}),
                                          ("WEBP", {"lossless": False}), ("WEBP", {"lossless": True})])
def test_declared_pixels_are_read_from_the_header(fmt, options):
    import io

    import tensorflow as tf
    from PIL import Image

    from tltool.exporting.graph_decode import declared_pixels

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((37, 53, 3), np.uint8)).save(buffer, fmt, **options)
    assert int(declared_pixels(tf.constant(buffer.getvalue()))) == 37 * 53


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding():
    """A TF Serving request with a decompression bomb (here a PNG header declaring 20000 x 20000 pixels)
    gets an error, not gigabytes allocated for it."""
    import struct
    import zlib

    import tensorflow as tf

    from tltool.exporting.graph_decode import decode_like_pillow

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))
    with pytest.raises(tf.errors.InvalidArgumentError, match="image too large"):
        decode_like_pillow(tf.constant(bomb), 32)
