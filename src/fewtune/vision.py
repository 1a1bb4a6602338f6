"""Vision-language models: what an image costs in tokens, the pixels a model gets, and what trains.

Supported: the Qwen2-VL family (Qwen2-VL, Qwen2.5-VL) and any ``AutoModelForImageTextToText`` model that
works the same way (the chat template writes one image token per ``{"type": "image"}`` part, that token
stands for ``patches / merge_size**2`` positions of the image's grid, and the model takes ``pixel_values``,
``image_grid_thw`` and ``mm_token_type_ids`` next to the token ids); and Idefics3 / SmolVLM, whose images
are tiles of image tokens between marker tokens.

The render function (``fewtune.data.render``) asks :class:`Vision` for the token ids each image becomes
and puts them where the template wrote the image token, so training, evaluation and generation see the
same ids; batches get their pixels from :meth:`Vision.batch_inputs`, with light augmentation on training
batches.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch

from fewtune.augment.image import augment_image
from fewtune.data.images import describe, load_image, seeded_rng

log = logging.getLogger(__name__)

# the modules between the vision tower and the language model, by model type (train_projector trains them)
PROJECTORS = {"qwen2_vl": "merger", "qwen2_5_vl": "merger", "idefics3": "connector", "smolvlm": "connector"}
# where the vision tower's blocks are (train_vision_blocks trains the top ones)
VISION_BLOCKS = {"qwen2_vl": "visual.blocks", "qwen2_5_vl": "visual.blocks", "idefics3": "vision_model.encoder.layers",
                 "smolvlm": "vision_model.encoder.layers"}
TILE_MODELS = ("idefics3", "smolvlm")  # images as tiles of image tokens between marker tokens
# the special tokens of an Idefics3/SmolVLM tokenizer (what _tile_markers writes): a text tokenizer made into one
# for such a model (a SmolLM2 backbone behind a vision tower) needs them added
TILE_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
               *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)))
VISION_TOWERS = ("visual", "vision_tower", "vision_model")  # module names of vision encoders (frozen by default)


class VisionError(ValueError):
    """A vision-language model or image example that fewtune cannot handle (with what to do instead)."""


def model_config(name_or_path: str) -> dict | None:
    """The config of a model folder, or of a hub id (``org/name``, when the hub or its cache answers); None
    for anything else (an embedded name, a .gguf file: text-only models)."""
    path = Path(name_or_path) / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    name = str(name_or_path)
    if name.count("/") != 1 or name.endswith(".gguf") or Path(name).exists():
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name).to_dict()
    except (OSError, ValueError):
        return None


def is_vision_config(config) -> bool:
    """A model config (dict or PretrainedConfig) of a vision-language model."""
    if config is None:
        return False
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    return get("vision_config") is not None


def is_vision_model(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return is_vision_config(getattr(base, "config", None))


def _default_backend() -> str | None:
    """The image processors' torchvision backend where torchvision is installed, else the PIL one (said
    explicitly: transformers otherwise warns on every load)."""
    import importlib.util

    return None if importlib.util.find_spec("torchvision") else "pil"


@dataclass
class Vision:
    """A model's image handling: the token ids each image becomes, pixel inputs for a batch, augmentation of
    training images.

    Two ways models take images: ``grid`` (Qwen2-VL): one image token repeated once per merged patch of the
    image's grid, pixels flattened over the batch with ``image_grid_thw``; ``tiles`` (Idefics3, SmolVLM): the
    image cut into tiles plus a global view, each tile ``image_seq_len`` image tokens between marker tokens
    (``<fake_token_around_image>``, ``<row_1_col_1>``, ``<global-img>``), pixels per batch row."""

    model_type: str
    image_processor: object
    image_token_id: int
    kind: str = "grid"
    merge_size: int = 1  # grid: patches merged into one position per side
    image_seq_len: int = 0  # tiles: image tokens per tile
    tokenizer: object = field(default=None, repr=False)  # tiles: tokenizes the marker string of each image
    augment: object = None  # config's data.augment.images, on the training set's copy only (:meth:`for_training`)
    seed: int = 0
    epoch: int = 0
    _ids: dict = field(default_factory=dict, repr=False)

    def for_training(self, augment, seed: int) -> "Vision":
        """A copy that augments the images it loads with ``augment`` (data.augment.images: prob and the changes'
        bounds); validation and inference keep the plain one. (Augmentation keeps each image's size, so its
        token ids do not change.)"""
        return replace(self, augment=augment if augment is not None and augment.prob > 0 else None, seed=seed)

    def image_ids(self, ref: str) -> list[int]:
        """The token ids that stand for the image where the chat template wrote its one image token."""
        if ref not in self._ids:
            img = load_image(ref)
            if self.kind == "grid":
                patches = self.image_processor.get_number_of_image_patches(img.height, img.width, {})
                self._ids[ref] = [self.image_token_id] * (patches // (self.merge_size ** 2))
            else:
                info = self.image_processor(images=[[img]], return_row_col_info=True)
                text = _tile_markers(info["rows"][0][0], info["cols"][0][0], self.image_seq_len)
                self._ids[ref] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._ids[ref]

    def image_tokens(self, ref: str) -> int:
        """Positions the image takes in the token sequence."""
        return len(self.image_ids(ref))

    def pixel_inputs(self, refs: list[str], keys: list | None = None,
                     per_row: list[int] | None = None) -> dict[str, torch.Tensor]:
        """The image processor's inputs for these images, in order (one batch's images; ``per_row``: how many
        belong to each row of the batch, which tiles models need). Training copies augment each image with a
        generator seeded by (seed, epoch, ``keys[i]``): a resumed run sees the same."""
        images = []
        for i, ref in enumerate(refs):
            img = load_image(ref)
            if self.augment is not None:
                rng = seeded_rng(self.seed, self.epoch, keys[i] if keys else i, ref)
                if rng.random() < self.augment.prob:
                    img = augment_image(img, rng, self.augment.options())[0]
            images.append(img)
        if self.kind == "grid":
            out = self.image_processor(images=images, return_tensors="pt")
            return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
        per_row = per_row or [len(images)]
        rows, given = [], 0
        for n in per_row:
            rows.append(images[given:given + n])
            given += n
        out = self.image_processor(images=rows, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "pixel_attention_mask": out["pixel_attention_mask"]}

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Qwen2-VL's ``mm_token_type_ids``: 1 at image positions, 0 elsewhere (its M-RoPE positions need it);
        None for models that take none."""
        if self.kind != "grid":
            return None
        return (input_ids == self.image_token_id).to(torch.int32)

    def batch_inputs(self, input_ids: torch.Tensor, refs: list[str], per_row: list[int],
                     keys: list | None = None) -> dict[str, torch.Tensor]:
        """Everything the model takes besides ``input_ids``/``attention_mask`` for a batch with these images."""
        out = self.pixel_inputs(refs, keys, per_row)
        types = self.token_types(input_ids)
        if types is not None:
            out["mm_token_type_ids"] = types
        return out

    def save(self, folder: str | Path) -> None:
        self.image_processor.save_pretrained(str(folder))


def _tile_markers(rows: int, cols: int, seq_len: int) -> str:
    """Idefics3's text for one image: a marked run of image tokens per tile, then the global view."""
    image = "<image>" * seq_len
    tiles = ""
    if rows or cols:
        for r in range(rows):
            tiles += "".join(f"<fake_token_around_image><row_{r + 1}_col_{c + 1}>{image}" for c in range(cols)) + "\n"
        tiles += "\n"
    return tiles + f"<fake_token_around_image><global-img>{image}<fake_token_around_image>"


def load_image_processor(folder: str, min_pixels: int | None = None, max_pixels: int | None = None):
    from transformers import AutoImageProcessor

    kwargs = {}
    if (backend := _default_backend()) is not None:
        kwargs["backend"] = backend
    processor = AutoImageProcessor.from_pretrained(folder, **kwargs)
    if min_pixels is not None or max_pixels is not None:
        size = dict(processor.size) if isinstance(processor.size, dict) else {
            "shortest_edge": processor.size.shortest_edge, "longest_edge": processor.size.longest_edge}
        size["shortest_edge"] = min_pixels if min_pixels is not None else size["shortest_edge"]
        size["longest_edge"] = max_pixels if max_pixels is not None else size["longest_edge"]
        processor = type(processor).from_dict({**processor.to_dict(), "size": size})
    return processor


def load_vision(model_path: str, processor_path: str | None = None, min_pixels: int | None = None,
                max_pixels: int | None = None) -> Vision | None:
    """The image handling of a model folder (None for a text-only model). ``processor_path``: where the image
    processor was saved when not with the model (a run's tokenizer/ folder)."""
    config = model_config(model_path)
    if not is_vision_config(config):
        return None
    model_type = config.get("model_type", "?")
    vision_config = config.get("vision_config") or {}
    image_token_id = config.get("image_token_id")
    folder = processor_path if processor_path and (Path(processor_path) / "preprocessor_config.json").is_file() \
        else model_path
    if model_type in TILE_MODELS:
        try:
            processor = load_image_processor(folder)
        except OSError as err:
            raise VisionError(f"{folder} has no image processor (preprocessor_config.json): {err}") from None
        from transformers import AutoTokenizer

        seq_len = int((vision_config.get("image_size", 224) // vision_config.get("patch_size", 32)) ** 2
                      / config.get("scale_factor", 2) ** 2)
        return Vision(model_type, processor, int(image_token_id), "tiles", image_seq_len=seq_len,
                      tokenizer=AutoTokenizer.from_pretrained(processor_path or model_path))
    merge = vision_config.get("spatial_merge_size")
    if image_token_id is None or merge is None:
        raise VisionError(f"{model_path} is a vision-language model ({model_type}) that fewtune does not render: it "
                          "trains the Qwen2-VL family (Qwen2-VL, Qwen2.5-VL, and models that work the same way: one "
                          "image token per merged patch) and Idefics3/SmolVLM")
    try:
        processor = load_image_processor(folder, min_pixels, max_pixels)
    except OSError as err:
        raise VisionError(f"{folder} has no image processor (preprocessor_config.json): {err}") from None
    if not hasattr(processor, "get_number_of_image_patches"):
        raise VisionError(f"the image processor of {model_path} ({type(processor).__name__}) cannot say how many "
                          "patches an image makes; fewtune needs that to render image tokens")
    return Vision(model_type, processor, int(image_token_id), "grid", merge_size=int(merge))


@lru_cache(maxsize=8)
def _cached_vision(model_path: str, processor_path: str | None, min_pixels: int | None,
                   max_pixels: int | None) -> Vision | None:
    return load_vision(model_path, processor_path, min_pixels, max_pixels)


def vision_for(model_name: str, processor_path: str | None = None, settings=None) -> Vision | None:
    """:func:`load_vision` for a model name as configs give it (an embedded name, a .gguf or a hub id has no
    config.json folder here: text-only), with ``model.vision``'s pixel bounds; loaded once per process."""
    lo = getattr(settings, "min_pixels", None)
    hi = getattr(settings, "max_pixels", None)
    return _cached_vision(str(model_name), processor_path, lo, hi)


# ---------------------------------------------------------------- what trains


def language_model_prefix(model) -> str:
    """The qualified name of the language model inside a vision-language model."""
    decoder = model.get_decoder()
    for name, module in model.named_modules():
        if module is decoder:
            return name
    raise VisionError(f"{type(model).__name__}: its language model was not found among its modules")


def lora_targets(model, target_modules) -> str:
    """peft's target_modules for LoRA on the language model only: a pattern over full module names, so the
    vision tower's linear layers (which may share names such as ``qkv`` or ``fc1``) get no adapter."""
    import re

    prefix = language_model_prefix(model)
    if target_modules == "all-linear":
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if n.startswith(prefix + ".") and isinstance(m, torch.nn.Linear)})
    else:
        names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not names:
        raise VisionError(f"no linear layer found in {prefix}")
    return rf"{re.escape(prefix)}\..*\.({'|'.join(re.escape(n) for n in names)})"


def _qualified(model, suffix: str) -> str | None:
    return next((n for n, _ in model.named_modules() if n == suffix or n.endswith("." + suffix)), None)


def modules_to_train(model, train_projector: bool, vision_blocks: int) -> list[str]:
    """Full names of the modules trained in full next to the adapter (peft's modules_to_save): the projector and
    the top ``vision_blocks`` blocks of the vision tower. Full names, because peft matches by suffix and
    ``blocks.1`` would also catch ``blocks.11``."""
    model_type = model.config.model_type
    names: list[str] = []
    if train_projector:
        projector = _qualified(model, PROJECTORS.get(model_type, "\0"))
        if projector is None:
            raise VisionError(f"model.vision.train_projector: the projector of {model_type} models is not known")
        names.append(projector)
    if vision_blocks:
        path = _qualified(model, VISION_BLOCKS.get(model_type, "\0"))
        if path is None:
            raise VisionError(f"model.vision.train_vision_blocks: the vision blocks of {model_type} are not known")
        total = len(model.get_submodule(path))
        if vision_blocks > total:
            raise VisionError(f"model.vision.train_vision_blocks={vision_blocks}, but the vision tower has {total}")
        names += [f"{path}.{i}" for i in range(total - vision_blocks, total)]
    return names


def check_images_supported(vision: Vision | None, model_name: str, example_source: str = "") -> None:
    if vision is None:
        where = f" ({example_source})" if example_source else ""
        raise VisionError(f"the data has images{where} but {model_name} is a text-only model: use a vision-language "
                          "model (e.g. a Qwen2-VL folder) or remove the images")


def image_summary(refs: list[str]) -> str:
    return ", ".join(describe(r) for r in refs[:3]) + (f" and {len(refs) - 3} more" if len(refs) > 3 else "")
