"""agegender.facedata.images: decoding whatever a dataset holds, and the face geometry."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from agegender.facedata.images import (
    ImageSkip,
    as_array,
    crop_face,
    face_box_in_crop,
    grow_box,
    load_rgb,
    resize_whole,
)


def png_bytes(width, height, bit_depth, color_type, raw_rows=None):
    """A PNG written by hand, for what Pillow cannot write (48-bit RGB) or must not decode
    (a header claiming a huge size)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    data = b"" if raw_rows is None else zlib.compress(b"".join(b"\0" + row for row in raw_rows))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


# geometry


def test_face_box_in_crop_is_the_middle_share():
    assert face_box_in_crop(180, 180, 0.4) == pytest.approx((40, 40, 140, 140))
    assert face_box_in_crop(90, 180, 0.4) == pytest.approx((20, 40, 70, 140))
    assert face_box_in_crop(64, 64, 0.0) == pytest.approx((0, 0, 64, 64))


def test_grow_box_squares_around_the_centre():
    assert grow_box((40, 40, 140, 140), 0.4) == pytest.approx((0, 0, 180, 180))
    assert grow_box((10, 20, 30, 60), 0.0) == pytest.approx((0, 20, 40, 60))  # 20x40 -> 40x40
    x1, y1, x2, y2 = grow_box((10, 20, 30, 60), 0.25)
    assert x2 - x1 == pytest.approx(60) and y2 - y1 == pytest.approx(60)
    assert ((x1 + x2) / 2, (y1 + y2) / 2) == pytest.approx((20, 40))


def test_grow_box_inverts_face_box_in_crop():
    box = face_box_in_crop(250, 250, 0.4)
    assert grow_box(box, 0.4) == pytest.approx((0, 0, 250, 250))


def test_crop_face_size_and_black_padding():
    image = Image.new("RGB", (100, 100), (255, 255, 255))
    face = crop_face(image, (50, 50, 150, 150), 32)  # lower right quarter lies outside
    assert face.size == (32, 32)
    pixels = as_array(face)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert pixels[:12, :12].min() == 255  # inside the photo: white
    assert pixels[20:, 20:].max() == 0  # outside: black
    assert pixels[20:, :12].max() == 0


def test_crop_face_cuts_the_box():
    pixels = np.zeros((100, 100, 3), np.uint8)
    pixels[20:60, 30:70] = 255
    face = crop_face(Image.fromarray(pixels), (30, 20, 70, 60), 16)
    assert as_array(face).min() == 255


def test_resize_whole():
    assert resize_whole(Image.new("RGB", (300, 120)), 64).size == (64, 64)


# decoding


def skip_reason(path, **kwargs):
    with pytest.raises(ImageSkip) as caught:
        load_rgb(path, **kwargs)
    return caught.value.reason


@pytest.fixture
def jpeg(tmp_path):
    path = tmp_path / "face.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def test_rgb_jpeg_loads(jpeg):
    image = load_rgb(jpeg, min_size=16)
    assert image.mode == "RGB" and image.size == (64, 48)


def test_missing_file(tmp_path):
    assert skip_reason(tmp_path / "nope.jpg") == "missing"


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert skip_reason(path) == "unreadable"


def test_truncated_jpeg(tmp_path, jpeg):
    path = tmp_path / "cut.jpg"
    path.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    assert skip_reason(path) == "unreadable"


def test_html_error_page_saved_as_jpeg(tmp_path):
    path = tmp_path / "page.jpg"
    path.write_text("<html><body>404</body></html>")
    assert skip_reason(path) == "unreadable"


def test_directory_is_unreadable(tmp_path):
    assert skip_reason(tmp_path) == "unreadable"


def test_too_small(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(path)
    assert skip_reason(path, min_size=16) == "too_small"
    assert load_rgb(path).size == (1, 1)  # default min_size 1
    Image.new("RGB", (200, 15)).save(path)  # the shorter side counts
    assert skip_reason(path, min_size=16) == "too_small"


def test_grayscale_png(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (20, 20), 77).save(path)
    assert as_array(load_rgb(path)).reshape(-1, 3).tolist()[0] == [77, 77, 77]


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(path, quality=100)  # red in CMYK
    image = load_rgb(path)
    assert image.mode == "RGB"
    r, g, b = as_array(image)[10, 10].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_palette_png(tmp_path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (20, 20), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.save(path)
    assert as_array(load_rgb(path))[5, 5].tolist() == [10, 200, 30]


def test_rgba_png_drops_alpha(tmp_path):
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (20, 20), (10, 20, 30, 128)).save(path)
    image = load_rgb(path)
    assert image.mode == "RGB" and as_array(image)[0, 0].tolist() == [10, 20, 30]


def test_48_bit_rgb_png(tmp_path):
    path = tmp_path / "rgb16.png"
    # 8 pixels, 16 bits per channel
    row = struct.pack(">" + "H" * 24, *([0x8000, 0x4000, 0xFF00] * 8))
    path.write_bytes(png_bytes(8, 4, 16, 2, [row] * 4))
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (8, 4)
    assert as_array(image)[0, 0].tolist() == [128, 64, 255]


def test_16_bit_grayscale_png_keeps_its_tones(tmp_path):
    path = tmp_path / "gray16.png"
    levels = np.repeat(np.arange(0, 256, 4, dtype=np.uint16)[np.newaxis, :], 8, axis=0)
    Image.fromarray(levels * 257).save(path)
    assert Image.open(path).mode == "I;16"
    pixels = as_array(load_rgb(path))
    assert pixels.shape == (8, 64, 3)
    assert np.abs(pixels[..., 0].astype(int) - levels).max() <= 1


def test_png_with_a_jpg_name(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    Image.new("RGB", (20, 20), (0, 128, 255)).save(path, format="PNG")
    assert as_array(load_rgb(path))[0, 0].tolist() == [0, 128, 255]


def test_exif_rotation_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red
    pixels[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(path, exif=exif, quality=100)
    image = load_rgb(path)
    assert image.size == (20, 40)  # width and height swapped
    result = as_array(image).astype(int)
    assert result[5, 10, 0] > 200 and result[5, 10, 2] < 60  # top: red (was left)
    assert result[35, 10, 2] > 200 and result[35, 10, 0] < 60  # bottom: blue (was right)


@pytest.mark.parametrize("side", [8000, 20000])  # 64 M pixels: Pillow's warning; 400 M: its error
def test_decompression_bomb(tmp_path, side):
    assert side * side > Image.MAX_IMAGE_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(side, side, 1, 0))  # header only: nothing may be decoded
    assert skip_reason(path) == "too_large"


def test_decompression_bomb_real_1_bit_png(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (8000, 8000)).save(path, compress_level=1)
    assert path.stat().st_size < 200_000
    assert skip_reason(path) == "too_large"
