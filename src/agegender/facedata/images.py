"""Image decoding and face geometry, shared by crop, predict and the tests."""

import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# refuse decompression bombs early; IMDB-WIKI photos are far smaller
Image.MAX_IMAGE_PIXELS = 40_000_000


class ImageSkip(Exception):
    """An image that cannot be used; `reason` is the key it is counted under."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def load_rgb(path, min_size=1):
    """Decode any format Pillow knows (whatever the extension), EXIF rotation applied, as RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image)
                image.load()
                # convert() would clip 16-bit tones, not scale them
                if image.mode.startswith("I;16"):
                    image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
                rgb = image.convert("RGB")
    except FileNotFoundError:
        raise ImageSkip("missing", str(path)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageSkip("too_large", str(path)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageSkip("unreadable", f"{path}: {error}") from None
    if min(rgb.size) < min_size:
        raise ImageSkip("too_small", f"{path}: {rgb.size[0]}x{rgb.size[1]}")
    return rgb


def face_box_in_crop(width, height, source_margin):
    """Where the face lies in a *_crop image, which is the face box grown by `source_margin`
    of its size on each side: the middle 1/(1+2m) of each axis."""
    share = source_margin / (1 + 2 * source_margin)
    return (width * share, height * share, width * (1 - share), height * (1 - share))


def grow_box(box, margin):
    """The face box with `margin` of its width/height added on each side, made square."""
    x1, y1, x2, y2 = box
    centre_x, centre_y = (x1 + x2) / 2, (y1 + y2) / 2
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    return (centre_x - side / 2, centre_y - side / 2, centre_x + side / 2, centre_y + side / 2)


def crop_face(image, box, size):
    """Cut `box` out of `image` (black outside the photo) and resize it to size x size."""
    left, top, right, bottom = (int(round(v)) for v in box)
    return image.crop((left, top, right, bottom)).resize(
        (size, size), Image.Resampling.BILINEAR, reducing_gap=2.0
    )


def resize_whole(image, size):
    return image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)


def as_array(image):
    return np.asarray(image, dtype=np.uint8)


def reframe_crop(image, face_margin, target_margin, size):
    """A face crop framed with `face_margin` around its face, re-cut so the face carries
    `target_margin` like the training crops (black where the new frame leaves the image)."""
    if abs(face_margin - target_margin) < 1e-9 and image.size == (size, size):
        return image
    box = face_box_in_crop(*image.size, face_margin)
    return crop_face(image, grow_box(box, target_margin), size)
