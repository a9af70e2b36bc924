"""Uploaded pictures: recognize them, check limits, decode and prepare them for a model.

The format is read from the file's first bytes, never from the client's ``Content-Type``: a
header is a claim, the bytes are what Pillow would parse. Limits are checked from the cheapest
evidence first: the byte count before anything is parsed, then ``width x height`` from the
header before a single pixel is decoded, so a small file that claims a huge picture (a
decompression bomb) costs a header read. Everything here is blocking and CPU-bound: callers
run it in a thread.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from inferd.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from inferd.models.spec import ImageSpec

__all__ = ["ImageInput", "Preprocessor", "sniff"]

_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
# Formats that are recognized only to say clearly that they are not accepted.
_OTHER_SIGNATURES = (
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"\x00\x00\x01\x00", "ico"),
)


def sniff(data: bytes) -> str | None:
    """The image format of ``data`` from its magic bytes (``jpeg``, ``png``, ``webp``, ``gif``,
    ...), or None when it does not start like any image format known here."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for signature, name in _OTHER_SIGNATURES:
        if data.startswith(signature):
            return name
    return None


@dataclass(frozen=True, slots=True)
class ImageInput:
    """One prepared picture: the model's input and what the picture was."""

    array: npt.NDArray[np.float32]
    """Shape ``(1, channels, size, size)``: a batch of one, as the batcher concatenates."""
    format: str
    width: int
    height: int


class Preprocessor:
    """Decodes and prepares pictures for one model (its ``[image]`` table)."""

    def __init__(self, image: ImageSpec) -> None:
        self.spec = image
        self.formats = tuple(image.formats)
        mean = np.asarray(image.mean_values, dtype=np.float32)
        std = np.asarray(image.std_values, dtype=np.float32)
        # (x / 255 - mean) / std as one multiply-add per pixel.
        self._scale = (1.0 / (255.0 * std)).astype(np.float32)
        self._offset = (-mean / std).astype(np.float32)

    def check_size(self, n_bytes: int) -> None:
        """413 when an upload of ``n_bytes`` is over the model's ``max_bytes``."""
        if n_bytes > self.spec.max_bytes:
            raise PayloadTooLarge(
                f"image of {n_bytes} bytes is over this model's limit of "
                f"{self.spec.max_bytes} bytes"
            )

    def check_format(self, data: bytes) -> str:
        """The accepted format of ``data``; 415 for anything else."""
        found = sniff(data)
        if found in self.formats:
            return found
        allowed = ", ".join(f.upper() for f in self.formats)
        if found is None:
            raise UnsupportedMediaType(
                f"the upload is not a recognizable image; send one of: {allowed}"
            )
        raise UnsupportedMediaType(
            f"{found.upper()} images are not accepted by this model; send one of: {allowed}"
        )

    def prepare(self, data: bytes) -> ImageInput:
        """Check, decode and prepare one upload; 413, 415 or 400 with the reason."""
        self.check_size(len(data))
        fmt = self.check_format(data)
        spec = self.spec
        try:
            with Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]]) as img:
                width, height = img.size
                if width * height > spec.max_pixels:
                    raise PayloadTooLarge(
                        f"image of {width}x{height} pixels is over this model's limit of "
                        f"{spec.max_pixels} pixels"
                    )
                if fmt == "jpeg":
                    # Let the JPEG decoder scale down by 1/2, 1/4 or 1/8 while it decodes
                    # (never below the size the resize needs): a big photo costs a fraction.
                    side = spec.shorter_side
                    img.draft("RGB" if spec.channels == "RGB" else "L", (side, side))
                img.load()
                array = self.from_picture(ImageOps.exif_transpose(img))
        except Image.DecompressionBombError as exc:
            raise PayloadTooLarge(f"image is too large to decode safely: {exc}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise BadRequest(
                f"the {fmt.upper()} image could not be decoded (truncated or corrupt): {exc}"
            ) from None
        return ImageInput(array, fmt, width, height)

    def from_picture(self, img: Image.Image) -> npt.NDArray[np.float32]:
        """A decoded picture as the model's input, ``(1, channels, size, size)`` (the same
        steps as for an upload; the digits demo prepares its training images with it)."""
        return self._resize_crop_normalize(self._convert(img))

    def _convert(self, img: Image.Image) -> Image.Image:
        """To the model's channels; transparent parts become white, as a viewer shows them."""
        mode = self.spec.channels
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
        return img if img.mode == mode else img.convert(mode)

    def _resize_crop_normalize(self, img: Image.Image) -> npt.NDArray[np.float32]:
        spec = self.spec
        side, size = spec.shorter_side, spec.size
        width, height = img.size
        # torchvision's Resize(int): the shorter side becomes ``side``, the longer one keeps
        # the aspect ratio (truncated); then CenterCrop(size) with rounded offsets.
        if width <= height:
            new_w, new_h = side, int(side * height / width)
        else:
            new_w, new_h = int(side * width / height), side
        if (new_w, new_h) != (width, height):
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        if (new_w, new_h) != (size, size):
            left = round((new_w - size) / 2.0)
            top = round((new_h - size) / 2.0)
            img = img.crop((left, top, left + size, top + size))
        pixels = np.asarray(img, dtype=np.float32)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        pixels = pixels * self._scale + self._offset
        return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])
