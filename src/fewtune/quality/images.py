"""`data check` for examples with images: files that cannot be read, sizes a model cannot use well, the same
picture under two names, and what each image costs in tokens under the model's image processor.

(A wrong number of ``<image>`` placeholders for the images listed is a schema error: the reader reports it
for the record, like any other field problem.)
"""

from __future__ import annotations

import hashlib
import statistics

from fewtune.data.collect import Collected
from fewtune.data.images import ImageError, decode_image, describe, image_bytes

MIN_SIDE = 28  # Qwen2-VL's smallest patch-merge unit: a side shorter than this is upscaled from almost nothing
MAX_ASPECT = 200  # Qwen2-VL's image processor refuses images more elongated than this
LARGE_PIXELS = 4096 * 4096  # above this, reading and resizing every epoch costs more than the training step


def image_problems(data: Collected, vision=None) -> dict | None:
    """Add the image problems of ``data`` and return image statistics (None when no example has images).
    ``vision`` (fewtune.vision.Vision) adds each image's token cost under the model's processor."""
    with_images = [e for e in data.examples if e.images]
    if not with_images:
        return None
    by_hash: dict[str, tuple[str, int]] = {}  # content hash -> (first reference, its line)
    tokens: list[int] = []
    sizes: list[tuple[int, int]] = []
    unreadable = 0
    for example in with_images:
        for i, ref in enumerate(example.images):
            where = f"images[{i}]"
            try:
                raw = image_bytes(ref)
                img = decode_image(raw, ref)
            except ImageError as err:
                unreadable += 1
                data.add("error", "images", example.line, where, str(err))
                continue
            w, h = img.size
            sizes.append((w, h))
            if min(w, h) < MIN_SIDE:
                data.add("warning", "images", example.line, where, f"{describe(ref)} is {w}x{h} pixels: a side under "
                         f"{MIN_SIDE} is blown up from almost nothing; the model sees little of it")
            if max(w, h) / max(min(w, h), 1) > MAX_ASPECT:
                data.add("error", "images", example.line, where, f"{describe(ref)} is {w}x{h}: more than {MAX_ASPECT} "
                         "times longer than wide, which the image processor refuses; crop or pad it")
            if w * h > LARGE_PIXELS:
                data.add("warning", "images", example.line, where, f"{describe(ref)} is {w}x{h} pixels: it is decoded "
                         "and resized at every use; store a smaller copy (model.vision.max_pixels bounds what the "
                         "model sees anyway)")
            first = by_hash.setdefault(hashlib.sha256(raw).hexdigest(), (ref, example.line))  # same bytes, same picture
            if first[0] != ref:
                data.add("warning", "images", example.line, where, f"{describe(ref)} is the same picture as "
                         f"{describe(first[0])} (line {first[1]}): a copy under another name counts twice")
            if vision is not None:
                try:
                    tokens.append(vision.image_tokens(ref))
                except (ImageError, ValueError) as err:
                    data.add("error", "images", example.line, where, f"the model's image processor cannot take "
                             f"{describe(ref)}: {err}")
    stats = {"examples_with_images": len(with_images),
             "images": sum(len(e.images) for e in with_images),
             "distinct_pictures": len(by_hash), "unreadable": unreadable}
    if sizes:
        stats["width"] = {"min": min(w for w, _ in sizes), "max": max(w for w, _ in sizes)}
        stats["height"] = {"min": min(h for _, h in sizes), "max": max(h for _, h in sizes)}
    if tokens:
        stats["tokens_per_image"] = {"mean": round(statistics.mean(tokens), 1), "min": min(tokens), "max": max(tokens)}
    return stats
