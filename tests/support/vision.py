"""Image models and pictures for tests: a tiny ResNet written in seconds, images in any format."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def write_image_model(
    root: Path,
    name: str = "tiny-vision",
    *,
    labels: list[str] | None = None,
    size: int = 16,
    channels: str = "RGB",
    image: str = "",
    batching: str = "",
    seed: int = 0,
) -> Path:
    """``root/name``: a ``resnet-small`` with random (seeded) weights, 3 classes by default.

    ``image`` and ``batching`` are extra TOML lines for those tables. Returns the version folder.
    """
    import torch

    from inferd.models.resnet import build

    labels = labels if labels is not None else ["cat", "dog", "bird"]
    folder = root / name
    version = folder / "1"
    version.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build("resnet-small", len(labels), in_channels=len(channels))
    torch.save(net.state_dict(), version / "resnet-small-test.pth")
    quoted = ", ".join(f'"{label}"' for label in labels)
    (folder / "model.toml").write_text(
        "\n".join(
            [
                'runtime = "torch"',
                'architecture = "resnet-small"',
                'description = "random weights, for tests"',
                "[input]",
                'type = "image"',
                "[image]",
                f"size = {size}",
                f'channels = "{channels}"',
                image,
                "[output]",
                f"labels = [{quoted}]",
                "[batching]",
                "max_batch_size = 8",
                batching,
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    return version


def picture(width: int = 40, height: int = 30, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A noisy picture (random pixels, seeded)."""
    rng = np.random.default_rng(seed)
    bands = len(mode) if mode in ("RGB", "RGBA", "L", "LA") else 3
    pixels = rng.integers(0, 256, size=(height, width, bands), dtype=np.uint8)
    return Image.fromarray(pixels[:, :, 0] if bands == 1 else pixels, mode=mode)


def encode(img: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **options)
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims ``width`` x ``height`` pixels (a decompression
    bomb's shape: small file, huge picture), with a correct header checksum."""
    import struct
    import zlib

    data = bytearray(encode(Image.new("L", (1, 1))))
    # IHDR: 8-byte signature, 4-byte length, b"IHDR", width, height, ..., CRC over type+data
    start = 8 + 4
    ihdr = bytearray(data[start : start + 4 + 13])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[start : start + 17] = ihdr
    data[start + 17 : start + 21] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)
