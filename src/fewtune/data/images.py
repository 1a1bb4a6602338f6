"""Images in examples: where they are and reading them.

An image belongs to the message that shows it. The message's text keeps an ``<image>`` placeholder
where the image stands (LLaMA-Factory's convention), and ``Message.images`` lists the references in
placeholder order: a file path (made absolute against the data file's folder when relative) or a
``data:`` URI. Remote URLs are refused: nothing is downloaded at training time.

Nothing here knows about models: how many tokens an image costs and what pixels a model gets are
``fewtune.vision``'s business; the changes augmentation makes are ``fewtune.augment.image``'s.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import random
from pathlib import Path

IMAGE_PLACEHOLDER = "<image>"


class ImageError(ValueError):
    """An image reference that cannot be used: remote, missing, unreadable."""


def resolve_image(ref: str, base_dir: str | Path | None) -> str:
    """The reference as it is stored in an example: an absolute path, or the data URI itself."""
    if not isinstance(ref, str) or not ref.strip():
        raise ImageError(f"an image reference must be a non-empty string, got {ref!r}")
    ref = ref.strip()
    if ref.startswith("data:"):
        return ref
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    if "://" in ref:
        raise ImageError(f"remote image {ref[:80]!r}: fewtune reads local files only (download it and give its path, "
                         "relative to the data file or absolute)")
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return str(path.resolve())


def describe(ref: str) -> str:
    """A short name for messages: the path, or the start of a data URI."""
    return ref if not ref.startswith("data:") else ref[:40] + "..."


def image_bytes(ref: str) -> bytes:
    if ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        if ";base64" not in header:
            raise ImageError(f"{describe(ref)}: only base64 data URIs are read")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ImageError(f"{describe(ref)}: the base64 payload is damaged ({err})") from None
    try:
        return Path(ref).read_bytes()
    except FileNotFoundError:
        raise ImageError(f"image file not found: {ref}") from None
    except OSError as err:
        raise ImageError(f"image {ref} cannot be read: {err.strerror or err}") from None


def load_image(ref: str):
    """The image as an RGB PIL image (ImageError when it is missing or not an image)."""
    return decode_image(image_bytes(ref), ref)


def decode_image(data: bytes, ref: str):
    """``data`` (the bytes of ``ref``, from :func:`image_bytes`) as an RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageError(f"{describe(ref)} is not a readable image ({type(err).__name__}: {err})") from None


def count_placeholders(text: str) -> int:
    return text.count(IMAGE_PLACEHOLDER)


def seeded_rng(seed: int, *keys) -> random.Random:
    """A generator for one image in one epoch: the same draws whatever else ran before (a resumed run sees the
    same pictures)."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))

