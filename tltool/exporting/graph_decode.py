"""Image decoding inside a TensorFlow graph, matching `images.load_image` (Pillow) as closely as TF can.

The SavedModel's `serving_default` signature takes encoded bytes, so TF Serving clients can send files
as they are. Phone photos are usually stored sideways with an EXIF orientation tag that viewers (and
Pillow's `exif_transpose`) apply; TensorFlow's decoders ignore it, so the tag is read here from the JPEG
header with plain tensor ops and applied before resizing.
"""

from __future__ import annotations

#: The most pixels an encoded image may declare, as for files tltool reads (data/images.py): a request
#: with a larger one is refused before decoding, not decoded into gigabytes (TF Serving's memory).
MAX_PIXELS = 120_000_000
#: How much of the file is searched for the EXIF header (it sits in the first segments of a JPEG).
_HEADER_BYTES = 65536
#: IFD0 entries looked at; the orientation tag comes early (tags are sorted, 0x0112 is small).
_MAX_ENTRIES = 64
_ORIENTATION_TAG = 0x0112


def decode_like_pillow(encoded, size: int):
    """One encoded image (scalar tf.string) -> (size, size, 3) uint8, as `load_image(path, size)` gives.

    Accurate JPEG DCT with its EXIF orientation applied, PNG transparency composited on white, GIF's
    first frame, BMP and WebP; antialiased bilinear resize (what Pillow's bilinear does when shrinking).
    """
    import tensorflow as tf

    def jpeg():
        return apply_orientation(decode_jpeg_draft(encoded, size), exif_orientation(encoded))

    def png():
        rgba = tf.cast(tf.io.decode_png(encoded, channels=4), tf.float32)
        alpha = rgba[..., 3:] / 255.0
        return tf.cast(tf.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)), tf.uint8)

    def other():  # GIF (first frame), BMP, WebP
        return tf.io.decode_image(encoded, channels=3, expand_animations=False)

    is_png = tf.equal(tf.strings.substr(encoded, 0, 4), b"\x89PNG")
    pixels = declared_pixels(encoded)
    check = tf.debugging.assert_less_equal(
        pixels, tf.constant(MAX_PIXELS, tf.int64),
        message=f"image too large: more than {MAX_PIXELS} pixels (the decompression-bomb guard of tltool)")
    with tf.control_dependencies([check]):
        image = tf.case([(tf.io.is_jpeg(encoded), jpeg), (is_png, png)], default=other)
    image = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def decode_jpeg_draft(encoded, size: int):
    """A JPEG decoded at the reduced scale Pillow's draft mode picks for a `size` x `size` target.

    libjpeg can scale by 1/2, 1/4 or 1/8 while decoding (in the DCT domain, hence fast). Pillow's
    `draft` takes the largest of these that keeps both sides at least `size`, and `load_image` uses it;
    a full-size decode resized in one step gives visibly different pixels (a mean difference of about 2
    levels on 500x375 photos at 160 px, up to 98 on an edge), hence the same choice here.
    """
    import tensorflow as tf

    shape = tf.image.extract_jpeg_shape(encoded)
    scale = tf.minimum(shape[0] // size, shape[1] // size)
    branch = tf.where(scale >= 8, 3, tf.where(scale >= 4, 2, tf.where(scale >= 2, 1, 0)))
    return tf.switch_case(branch, [lambda ratio=ratio: tf.io.decode_jpeg(encoded, channels=3, ratio=ratio,
                                                                         dct_method="INTEGER_ACCURATE")
                                   for ratio in (1, 2, 4, 8)])


def declared_pixels(encoded):
    """Width x height as the file's header declares it (int64), read before anything is decoded; 0 when the
    format is not one tltool reads the size of (the decoder then fails on it or decodes it as it is).

    JPEG: TensorFlow's own header reader. PNG: IHDR (big-endian). GIF: the logical screen. BMP: the info
    header (a negative height means top-down rows). WebP: VP8X canvas, VP8 frame or VP8L header.
    """
    import tensorflow as tf

    head = tf.io.decode_raw(tf.strings.substr(encoded, 0, 32), tf.uint8)
    data = tf.pad(tf.cast(head, tf.int64), [[0, 32 - tf.shape(head)[0]]])

    def le(i, n):  # little-endian unsigned of n bytes at i
        return sum(data[i + k] * (256 ** k) for k in range(n))

    def be(i, n):
        return sum(data[i + k] * (256 ** (n - 1 - k)) for k in range(n))

    def starts(prefix: bytes, at: int = 0):
        return tf.equal(tf.strings.substr(encoded, at, len(prefix)), prefix)

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(encoded), tf.int64)
        return shape[0] * shape[1]

    def bmp():
        height = le(22, 4)
        height = tf.where(height >= 2 ** 31, 2 ** 32 - height, height)
        return le(18, 4) * height

    def webp():
        vp8x = (le(24, 3) + 1) * (le(27, 3) + 1)
        vp8 = tf.bitwise.bitwise_and(le(26, 2), 0x3FFF) * tf.bitwise.bitwise_and(le(28, 2), 0x3FFF)
        bits = le(21, 4)
        vp8l = (tf.bitwise.bitwise_and(bits, 0x3FFF) + 1) * (tf.bitwise.bitwise_and(
            tf.bitwise.right_shift(bits, 14), 0x3FFF) + 1)
        return tf.case([(starts(b"VP8X", 12), lambda: vp8x), (starts(b"VP8 ", 12), lambda: vp8),
                        (starts(b"VP8L", 12), lambda: vp8l)], default=lambda: tf.constant(0, tf.int64))

    return tf.case([
        (tf.io.is_jpeg(encoded), jpeg),
        (starts(b"\x89PNG"), lambda: be(16, 4) * be(20, 4)),
        (starts(b"GIF8"), lambda: le(6, 2) * le(8, 2)),
        (starts(b"BM"), bmp),
        (tf.logical_and(starts(b"RIFF"), starts(b"WEBP", 8)), webp),
    ], default=lambda: tf.constant(0, tf.int64))


def exif_orientation(encoded):
    """The EXIF orientation (1..8) of a JPEG's bytes; 1 when there is none or it cannot be read.

    Reads: the segments after SOI up to the APP1 "Exif" one, its TIFF header (byte order, IFD0 offset)
    and IFD0's entries. Every read is clipped to a zero-padded copy of the header, so a truncated or
    odd file gives 1, never an error.
    """
    import tensorflow as tf

    head = tf.io.decode_raw(tf.strings.substr(encoded, 0, _HEADER_BYTES), tf.uint8)
    data = tf.pad(tf.cast(head, tf.int32), [[0, _HEADER_BYTES + 16 - tf.shape(head)[0]]])
    last = _HEADER_BYTES

    def byte(i):
        return tf.gather(data, tf.clip_by_value(i, 0, last))

    def u16(i, little):
        a, b = byte(i), byte(i + 1)
        return tf.where(little, a + 256 * b, 256 * a + b)

    def u32(i, little):
        return tf.where(little, u16(i, little) + 65536 * u16(i + 2, little),
                        65536 * u16(i, little) + u16(i + 2, little))

    big_endian = tf.constant(False)

    # Walk the segments (marker FF xx, then a big-endian length) until APP1 with "Exif\0\0".
    def is_exif(pos):
        header = tf.stack([byte(pos + 4 + k) for k in range(6)])
        return tf.logical_and(tf.equal(byte(pos + 1), 0xE1), tf.reduce_all(tf.equal(header, list(b"Exif\0\0"))))

    def keep_walking(pos, found, step):
        return tf.logical_and(tf.logical_and(tf.logical_not(found), step < 16),
                              tf.logical_and(pos < last, tf.equal(byte(pos), 0xFF)))

    def next_segment(pos, found, step):
        hit = is_exif(pos)
        return tf.where(hit, pos, pos + 2 + u16(pos + 2, big_endian)), hit, step + 1

    app1, found, _ = tf.while_loop(keep_walking, next_segment, (tf.constant(2), tf.constant(False), tf.constant(0)))

    tiff = app1 + 10
    little = tf.equal(byte(tiff), 0x49)  # "II": little-endian, "MM": big-endian
    ifd0 = tiff + u32(tiff + 4, little)
    count = u16(ifd0, little)
    entries = ifd0 + 2 + 12 * tf.range(_MAX_ENTRIES)
    tags = u16(entries, little)
    hits = tf.logical_and(tf.equal(tags, _ORIENTATION_TAG), tf.range(_MAX_ENTRIES) < count)
    value = u16(tf.gather(entries, tf.argmax(tf.cast(hits, tf.int32), output_type=tf.int32)) + 8, little)
    valid = tf.logical_and(tf.logical_and(found, tf.reduce_any(hits)), tf.logical_and(value >= 1, value <= 8))
    return tf.where(valid, value, 1)


def apply_orientation(image, orientation):
    """Turn an (H, W, C) image upright for its EXIF orientation, as PIL.ImageOps.exif_transpose does."""
    import tensorflow as tf

    def transpose():
        return tf.transpose(image, [1, 0, 2])

    branches = [
        lambda: image,                                # 1: upright
        lambda: tf.image.flip_left_right(image),      # 2: mirrored
        lambda: tf.image.rot90(image, 2),             # 3: upside down
        lambda: tf.image.flip_up_down(image),         # 4: mirrored upside down
        transpose,                                    # 5: mirrored, turned
        lambda: tf.image.rot90(image, 3),             # 6: stored turned left: turn 90 degrees clockwise
        lambda: tf.image.rot90(transpose(), 2),       # 7: mirrored, turned the other way
        lambda: tf.image.rot90(image, 1),             # 8: stored turned right: turn 90 degrees anticlockwise
    ]
    return tf.switch_case(orientation - 1, branches)
