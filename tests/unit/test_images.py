"""Uploads: formats from the bytes, limits before decoding, and torchvision's preparation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from inferd.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from inferd.models.images import Preprocessor, sniff
from inferd.models.spec import ImageSpec
from tests.support.vision import encode, picture, png_claiming


def test_formats_are_recognized_from_the_first_bytes() -> None:
    img = picture()
    assert sniff(encode(img, "PNG")) == "png"
    assert sniff(encode(img, "JPEG")) == "jpeg"
    assert sniff(encode(img, "WEBP")) == "webp"
    assert sniff(encode(img, "GIF")) == "gif"
    assert sniff(encode(img, "BMP")) == "bmp"
    assert sniff(b'{"features": [1, 2]}') is None
    assert sniff(b"") is None


def test_normalization_is_scale_then_mean_and_std_per_channel() -> None:
    img = picture(16, 16)
    pre = Preprocessor(ImageSpec(size=16, mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 2.0]))
    out = pre.prepare(encode(img, "PNG"))
    assert out.array.shape == (1, 3, 16, 16)
    assert out.array.dtype == np.float32
    assert (out.format, out.width, out.height) == ("png", 16, 16)
    pixels = np.asarray(img, dtype=np.float64) / 255.0
    expected = ((pixels - [0.1, 0.2, 0.3]) / [0.5, 0.25, 2.0]).transpose(2, 0, 1)
    np.testing.assert_allclose(out.array[0], expected, rtol=1e-5, atol=1e-5)


def test_the_shorter_side_is_resized_then_the_centre_is_cropped() -> None:
    # 32 wide, 16 high, already at the resize size: only the crop applies, columns 8..24.
    img = picture(32, 16, mode="L")
    pre = Preprocessor(ImageSpec(size=16, channels="L", mean=[0.0], std=[1.0]))
    out = pre.prepare(encode(img, "PNG")).array
    expected = np.asarray(img, dtype=np.float64)[:, 8:24] / 255.0
    np.testing.assert_allclose(out[0, 0], expected, atol=1e-6)

    # resize 20 then crop 16 from a 40x80 picture: shorter side 40 -> 20, longer 80 -> 40.
    big = picture(40, 80)
    pre = Preprocessor(ImageSpec(size=16, resize=20))
    resized = big.resize((20, 40), Image.Resampling.BILINEAR).crop((2, 12, 18, 28))
    got = pre.prepare(encode(big, "PNG")).array[0]
    want = (np.asarray(resized, dtype=np.float64) / 255.0 - [0.485, 0.456, 0.406]) / [
        0.229,
        0.224,
        0.225,
    ]
    np.testing.assert_allclose(got, want.transpose(2, 0, 1), atol=1e-5)


def test_modes_are_converted_and_transparency_becomes_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    pre = Preprocessor(ImageSpec(size=8, channels="L", mean=[0.0], std=[1.0]))
    out = pre.prepare(encode(rgba, "PNG")).array
    np.testing.assert_allclose(out, 1.0)  # white
    gray = Preprocessor(ImageSpec(size=8)).prepare(encode(picture(8, 8, mode="L"), "PNG"))
    assert gray.array.shape == (1, 3, 8, 8)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_decode(fmt: str) -> None:
    img = Image.new("RGB", (300, 200), (200, 100, 50))
    out = Preprocessor(ImageSpec(size=32, mean=[0, 0, 0], std=[1, 1, 1])).prepare(
        encode(img, fmt, quality=95)
    )
    assert out.array.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(out.array[0, :, 16, 16], [200 / 255, 100 / 255, 50 / 255], atol=0.03)


def test_other_formats_and_non_images_get_415_with_what_is_accepted() -> None:
    pre = Preprocessor(ImageSpec(formats=["png", "webp"]))
    with pytest.raises(UnsupportedMediaType, match=r"JPEG images are not accepted.*PNG, WEBP"):
        pre.prepare(encode(picture(), "JPEG"))
    with pytest.raises(UnsupportedMediaType, match="GIF images are not accepted"):
        pre.prepare(encode(picture(), "GIF"))
    with pytest.raises(UnsupportedMediaType, match="not a recognizable image"):
        pre.prepare(b"hello, this is text")


def test_over_the_byte_limit_is_413() -> None:
    data = encode(picture(64, 64), "PNG")
    with pytest.raises(PayloadTooLarge, match=f"image of {len(data)} bytes is over"):
        Preprocessor(ImageSpec(max_bytes=len(data) - 1)).prepare(data)


def test_over_the_pixel_limit_is_413_before_decoding() -> None:
    with pytest.raises(PayloadTooLarge, match="64x64 pixels is over this model's limit of 4000"):
        Preprocessor(ImageSpec(max_pixels=4000)).prepare(encode(picture(64, 64), "PNG"))


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    # 81 megapixels in a few dozen bytes: over the model's limit, under Pillow's own guard.
    bomb = png_claiming(9_000, 9_000)
    assert len(bomb) < 200
    with pytest.raises(PayloadTooLarge, match="9000x9000 pixels is over"):
        Preprocessor(ImageSpec()).prepare(bomb)
    # Past Pillow's guard (2 x Image.MAX_IMAGE_PIXELS), Pillow refuses it at open: still 413.
    with pytest.raises(PayloadTooLarge, match="too large to decode safely"):
        Preprocessor(ImageSpec(max_pixels=10**12)).prepare(png_claiming(60_000, 60_000))


def test_a_truncated_image_is_400() -> None:
    data = encode(picture(64, 64), "PNG")
    with pytest.raises(BadRequest, match="PNG image could not be decoded"):
        Preprocessor(ImageSpec()).prepare(data[: len(data) // 2])
