"""The table of augmentation methods: one entry each (name, kind, options, builder).

Adding a method is a module with an ``Options`` subclass and a builder ``(options, resources) ->
Augmenter``, and one entry here. The modules import their heavy libraries (jieba, nltk, pypinyin,
torch, PIL) inside the builders, so reading this table stays cheap.
"""

from __future__ import annotations

from fewtune.augment import options as o
from fewtune.augment.base import AUGMENT_METHODS, AugmentError, AugmentMethod, register_method

register_method(AugmentMethod(
    "eda", "text", o.EdaOptions, "fewtune.augment.eda:build_eda", online=True,
    description="Easy data augmentation: synonym replacement, random insertion, random swap, random deletion "
    "(English: WordNet; Chinese: jieba + HIT Cilin, content words of the same part of speech only)."))
register_method(AugmentMethod(
    "noise", "text", o.NoiseOptions, "fewtune.augment.noise:build_noise", online=True,
    description="Speech-recognition-style noise: fillers (嗯, 那个, um), repeated words, Chinese homophones."))
register_method(AugmentMethod(
    "backtranslate", "llm", o.BacktranslateOptions, "fewtune.augment.llm:build_backtranslate",
    description="Round-trip translation (zh→en→zh, en→de→en) by a local LLM (--model) or a translation model folder."))
register_method(AugmentMethod(
    "paraphrase", "llm", o.ParaphraseOptions, "fewtune.augment.llm:build_paraphrase",
    description="K paraphrases per input by a local LLM (--model) through its chat template."))
register_method(AugmentMethod(
    "dialogue", "llm", o.DialogueOptions, "fewtune.augment.llm:build_dialogue",
    description="Dialogue extension for chat data: varied user turns and new turns by a local LLM."))
register_method(AugmentMethod(
    "image", "image", o.ImageOptions, "fewtune.augment.image:build_image", online=True,
    description="Light image changes for image-text examples: brightness, contrast, small rotation and crop."))


def get_method(name: str) -> AugmentMethod:
    """The table's entry for ``name``; AugmentError naming the known ones otherwise."""
    if name not in AUGMENT_METHODS:
        raise AugmentError(f"unknown augmentation method {name!r}; known: {', '.join(AUGMENT_METHODS)}")
    return AUGMENT_METHODS[name]
