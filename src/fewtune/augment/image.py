"""Light image changes for image-text examples: brightness, contrast, a small rotation and a crop.

Pillow only (torchvision does not install beside our torch). Every change is drawn uniformly up to
its option, and the options have hard ceilings, so an augmentation stays the same picture: a
question about it keeps its answer. The crop cuts at most ``crop`` of each side and is resized back,
so the size never changes; the corners a rotation uncovers are filled with the image's mean colour
rather than black, so no dark wedge appears.

An example's images are its messages' (``Message.images``: LLaMA-Factory ``images`` lists and OpenAI image
parts are read into them). The augmented images are written to ``out_dir`` (or a temporary folder), and each
candidate's messages point at them, placeholders unchanged. Training applies the same changes afresh each epoch
without writing files (``data.augment.images``, fewtune.vision).
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from pathlib import Path


from dataclasses import replace

from fewtune.augment.base import AugmentError, Candidate, Resources, with_messages
from fewtune.augment.options import ImageOptions
from fewtune.data.formats import Example
from fewtune.data.images import ImageError, load_image


def augment_image(img, rng: random.Random, options: ImageOptions):
    """``(new image, params)``: one random draw of every change, the same size as ``img``."""
    from PIL import Image, ImageEnhance, ImageStat

    params = {
        "brightness": round(rng.uniform(-options.brightness, options.brightness), 4),
        "contrast": round(rng.uniform(-options.contrast, options.contrast), 4),
        "rotate": round(rng.uniform(-options.rotate, options.rotate), 3),
        "crop": [round(rng.uniform(0, options.crop), 4) for _ in range(4)],  # left, top, right, bottom
    }
    mode = img.mode
    out = img.convert("RGB") if mode not in ("RGB", "L") else img.copy()
    out = ImageEnhance.Brightness(out).enhance(1 + params["brightness"])
    out = ImageEnhance.Contrast(out).enhance(1 + params["contrast"])
    if params["rotate"]:
        fill = tuple(round(v) for v in ImageStat.Stat(out).mean)
        out = out.rotate(params["rotate"], resample=Image.Resampling.BICUBIC, fillcolor=fill if len(fill) > 1 else fill[0])
    w, h = out.size
    left, top, right, bottom = params["crop"]
    box = (round(left * w), round(top * h), w - round(right * w), h - round(bottom * h))
    if box != (0, 0, w, h):
        out = out.crop(box).resize((w, h), Image.Resampling.BICUBIC)
    return out, params


def build_image(options: ImageOptions, resources: Resources):
    out_dir: list[Path] = [Path(options.out_dir)] if options.out_dir else []

    def folder() -> Path:
        if not out_dir:
            out_dir.append(Path(tempfile.mkdtemp(prefix="fewtune-augment-images-")))
        out_dir[0].mkdir(parents=True, exist_ok=True)
        return out_dir[0]

    def augment(example: Example, n: int, rng: random.Random, protected: list[str]) -> list[Candidate]:
        paths = example.images
        out = []
        for _ in range(n):
            new_paths, applied = [], []
            for path in paths:
                try:
                    img = load_image(path)
                except ImageError as err:
                    raise AugmentError(f"{err} (in {example.source} line {example.line})") from None
                new, params = augment_image(img, rng, options)
                # named by content of the change, so reruns with the same seed rewrite the same files
                digest = hashlib.sha1(json.dumps([path, params]).encode()).hexdigest()[:10]
                source = Path(path) if not path.startswith("data:") else Path("inline.png")
                target = folder() / f"{source.stem}.aug-{digest}{source.suffix or '.png'}"
                new.save(target)
                new_paths.append(str(target))
                applied.append(params)
            if new_paths:
                given, messages = 0, []
                for m in example.messages:  # the same placeholders, each pointing at its changed picture
                    messages.append(replace(m, images=tuple(new_paths[given:given + len(m.images)])))
                    given += len(m.images)
                out.append(Candidate(with_messages(example, messages), {"images": applied}))
        return out

    return augment
