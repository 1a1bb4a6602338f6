"""Speech-style noise: fillers, repetitions and Chinese homophones, never inside protected spans, only in user
turns, and the same text for the same rng."""

from __future__ import annotations

import random

import pytest
from pypinyin import Style, lazy_pinyin

from fewtune.augment.base import Resources
from fewtune.augment.methods import get_method
from fewtune.augment.noise import NoiseOptions, homophones, noise_text
from fewtune.data.formats import Example, Message

ZH = "打开空调然后把温度调到二十六度"
ZH_KEEP = ["打开空调", "二十六度"]
EN = "Play the newest album by The Beatles on Spotify, please."
EN_KEEP = ["The Beatles", "Spotify"]


def run(text, seed, keep, zh, **options):
    return noise_text(text, NoiseOptions(**options), random.Random(seed), keep, zh)


@pytest.mark.parametrize("text,keep,zh", [(ZH, ZH_KEEP, True), (EN, EN_KEEP, False)])
def test_noise_changes_the_text_and_keeps_protected_spans(text, keep, zh):
    for seed in range(60):
        new, kinds = run(text, seed, keep, zh, p_filler=0.7, p_repeat=0.7, p_homophone=0.7)
        assert kinds and new != text
        assert all(span in new for span in keep), (seed, new)
        assert new == run(text, seed, keep, zh, p_filler=0.7, p_repeat=0.7, p_homophone=0.7)[0]


def test_fillers_and_repeats_only_add_text():
    for seed in range(30):
        new, kinds = run(EN, seed, EN_KEEP, False, p_filler=1.0, p_repeat=0.0)
        assert kinds[0].startswith("filler:")
        filler = kinds[0].split(":", 1)[1]
        assert filler in NoiseOptions().fillers_en
        # taking the filler out gives the sentence back, spaces and punctuation included
        words, k = new.split(), len(filler.split())
        if new.startswith(filler[:1].upper() + filler[1:] + ","):  # at the start: "Um, play the ..."
            assert new == filler[:1].upper() + filler[1:] + ", p" + EN[1:]
        else:
            assert any(" ".join(words[i:i + k]) == filler and " ".join(words[:i] + words[i + k:]) == EN
                       for i in range(len(words))), new
        new, kinds = run(ZH, seed, ZH_KEEP, True, p_filler=0.0, p_repeat=1.0, p_homophone=0.0)
        word = kinds[0].split(":", 1)[1]
        assert new.replace(word + word, word, 1) == ZH and word not in ZH_KEEP


def test_homophones_sound_the_same_and_stay_out_of_protected_spans():
    assert "拨" in homophones("播") and "播" not in homophones("播")
    for ch in "放调度温":
        for other in homophones(ch):
            assert lazy_pinyin(other, style=Style.NORMAL) == lazy_pinyin(ch, style=Style.NORMAL)
    for seed in range(40):
        new, kinds = run(ZH, seed, ZH_KEEP, True, p_filler=0.0, p_repeat=0.0, p_homophone=1.0)
        assert len(new) == len(ZH) and kinds[0].startswith("homophone:")
        diff = [i for i, (a, b) in enumerate(zip(ZH, new)) if a != b]
        assert len(diff) == 1
        i = diff[0]
        assert lazy_pinyin(ZH[i], style=Style.NORMAL) == lazy_pinyin(new[i], style=Style.NORMAL)
        assert not (0 <= i < 4 or ZH.index("二十六度") <= i < ZH.index("二十六度") + 4)
    assert run(EN, 0, [], False, p_filler=0.0, p_repeat=0.0, p_homophone=1.0)[1][0].split(":")[0] in ("filler", "repeat")


def test_the_method_touches_only_user_turns():
    example = Example([Message("system", "解析车载指令，输出 JSON。"), Message("user", ZH),
                       Message("assistant", '{"actions": ["打开空调"], "conditions": []}')], "car.jsonl", 2)
    augment = get_method("noise").make({}, Resources())
    out = augment(example, 4, random.Random(3), ZH_KEEP)
    assert len(out) == 4 and len({c.example.messages[1].content for c in out}) > 1
    for c in out:
        assert c.example.messages[0] == example.messages[0] and c.example.messages[2] == example.messages[2]
        assert c.params["noise"]
    assert get_method("noise").online
