"""The options of each augmentation method, apart from the methods themselves.

The method table (methods.py) and the config's data.augment check read these without importing a
method's module (nor what that module reaches: the generation stack, jieba, nltk, PIL).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fewtune.augment.base import Options

Op = Literal["sr", "ri", "rs", "rd"]


class EdaOptions(Options):
    alpha_sr: float = 0.1  # share of words replaced by a synonym
    alpha_ri: float = 0.1  # share of words' synonyms inserted
    alpha_rs: float = 0.1  # share of words swapped
    p_rd: float = 0.1  # chance each word is deleted
    ops: list[Op] = ["sr", "ri", "rs", "rd"]
    language: Literal["auto", "en", "zh"] = "auto"


class NoiseOptions(Options):
    p_filler: float = 0.5
    p_repeat: float = 0.3
    p_homophone: float = 0.3
    language: Literal["auto", "en", "zh"] = "auto"
    fillers_zh: list[str] = ["嗯", "那个", "就是", "呃", "嗯嗯", "然后"]
    fillers_en: list[str] = ["um", "uh", "like", "you know", "so"]


# the default few-shot pairs of the paraphrase prompt: one English, one Chinese
EXAMPLES = [
    ["Play some jazz by Miles Davis in the kitchen", "Put on some Miles Davis jazz in the kitchen"],
    ["把空调温度调到二十四度", "帮我把空调调成二十四度"],
]


class BacktranslateOptions(Options):
    pivot: str | None = Field(None, description="Pivot language (name or code); None: English for Chinese text, "
                              "German for English text.")
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int | None = Field(None, gt=0, description="None: twice the input's tokens + 16, at most 256.")
    translator: str | None = Field(None, description="A local translation model folder (e.g. MarianMT) holding "
                                   "to/ (source -> pivot) and back/ (pivot -> source); used instead of --model.")
    prompt: str | None = Field(None, description="Translation instruction with {source}, {target}, {keep} and {text}; "
                               "None: a built-in one, in the target language's words for the way back.")


class ParaphraseOptions(Options):
    temperature: float = Field(0.9, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int | None = Field(None, gt=0, description="None: twice the input's tokens + 16, at most 256.")
    instruction: str | None = Field(None, description="System instruction with {keep} (the protected phrases); "
                                    "None: a built-in one in the input's language.")
    examples: list[list[str]] = Field(EXAMPLES, description="Few-shot [source, paraphrase] pairs, shown as earlier "
                                      "user/assistant turns.")


class DialogueOptions(Options):
    modes: list[str] = Field(["vary_user", "new_turn"], description="vary_user: paraphrase one user turn; "
                             "new_turn: append a follow-up question and the model's reply.")
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(96, gt=0)
    train_generated: bool = Field(False, description="Train on the generated assistant replies (default: weight 0).")


class ImageOptions(Options):
    brightness: float = Field(0.15, ge=0, le=0.5, description="Largest relative brightness change.")
    contrast: float = Field(0.15, ge=0, le=0.5, description="Largest relative contrast change.")
    rotate: float = Field(5, ge=0, le=20, description="Largest rotation, degrees.")
    crop: float = Field(0.05, ge=0, le=0.2, description="Largest share cut from each side (resized back).")
    out_dir: str | None = Field(None, description="Where augmented images are written; None: a temporary folder.")
