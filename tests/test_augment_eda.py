"""EDA on English (WordNet) and Chinese (jieba + Cilin): each operation does what it says, protected spans
and everything but the user turns stay, function words and particles never change, same rng same text."""

from __future__ import annotations

import random
import re

import pytest

from fewtune.augment import lexicon
from fewtune.augment.base import AugmentError, Resources
from fewtune.augment.methods import get_method
from fewtune.augment.eda import EdaOptions, eda_text
from fewtune.data.formats import Example, Message

EN = "Play the newest album by The Beatles on Spotify, please."
EN_KEEP = ["The Beatles", "Spotify"]
ZH = "帮我把空调温度调到二十六度吧"
ZH_KEEP = ["二十六"]
ZH2 = "我想去北京看一部好看的电影吧"


def run(text, op, seed, keep, zh, **options):
    return eda_text(text, op, EdaOptions(**options), random.Random(seed), keep, zh)


@pytest.mark.parametrize("op", ["sr", "ri", "rs", "rd"])
@pytest.mark.parametrize("text,keep,zh", [(EN, EN_KEEP, False), (ZH, ZH_KEEP, True)])
def test_protected_spans_survive_every_operation(op, text, keep, zh):
    changed_any = False
    for seed in range(40):
        new, changed = run(text, op, seed, keep, zh, alpha_sr=0.5, alpha_ri=0.5, alpha_rs=0.5, p_rd=0.5)
        assert all(span in new for span in keep), (op, seed, new)
        changed_any |= new != text
        assert (new != text) == bool(changed) or op == "rs"  # a swap of two equal words changes nothing
    assert changed_any


@pytest.mark.parametrize("op", ["sr", "ri", "rs", "rd"])
def test_same_rng_same_text(op):
    assert run(EN, op, 7, EN_KEEP, False) == run(EN, op, 7, EN_KEEP, False)
    assert run(ZH2, op, 7, [], True) == run(ZH2, op, 7, [], True)


def test_english_replacement_uses_wordnet_synonyms_and_keeps_case_and_punctuation():
    seen = set()
    for seed in range(30):
        new, changed = run(EN, "sr", seed, EN_KEEP, False)
        for old, repl in changed:
            core = re.sub(r"[^\w']", "", old)
            assert repl.lower().strip(",.") in lexicon.english_synonyms(core, 3)
            assert core.lower() not in lexicon.STOPWORDS_EN
            assert repl[:1].isupper() == old[:1].isupper()
            seen.add(core)
        assert new.endswith(".") and len(new.split()) == len(EN.split())
    assert seen and not seen & {"the", "by", "on", "please"}


def test_english_synonyms_follow_the_common_part_of_speech():
    assert "film" in lexicon.english_synonyms("movie")
    assert "drama" not in lexicon.english_synonyms("play")  # "play" is mostly a verb
    assert lexicon.english_synonyms("qwzx") == ()


def test_swap_moves_words_not_punctuation_and_deletion_never_empties():
    for seed in range(30):
        new, _ = run(EN, "rs", seed, EN_KEEP, False)
        assert sorted(re.findall(r"\w+", new.lower())) == sorted(re.findall(r"\w+", EN.lower()))
        assert new.endswith(".") and new.count(",") == 1
        short, changed = run("turn it up", "rd", seed, [], False, p_rd=1.0)
        assert short.strip() and len(changed) == 2
        assert len(run("turn it up", "rd", seed, [], False, p_rd=0.0)[1]) == 1  # always one deletion


def test_insertion_adds_synonyms_of_words_in_the_sentence():
    from fewtune.augment.eda import _words_zh

    allowed = {s for w in _words_zh(ZH2, []) for s in lexicon.chinese_synonyms(w.text, w.pos)}
    assert allowed
    for seed in range(20):
        new, changed = run(ZH2, "ri", seed, [], True, alpha_ri=0.2)
        assert len(changed) == 2  # round(0.2 * 10 words)
        for _, word in changed:
            assert word in allowed and new.count(word) > ZH2.count(word)
        assert len(new) == len(ZH2) + sum(len(w) for _, w in changed)


def test_chinese_replaces_only_content_words_with_the_same_part_of_speech():
    for word in ["去", "吧", "把", "我", "的", "帮我", "一部"]:
        assert lexicon.chinese_synonyms(word, lexicon.chinese_pos(word) or "v") == (), word
    assert "广播" in lexicon.chinese_synonyms("播放", "v") or "播送" in lexicon.chinese_synonyms("播放", "v")
    replaced = set()
    for seed in range(60):
        _, changed = run(ZH2, "sr", seed, [], True, alpha_sr=0.5)
        for old, new in changed:
            assert old not in lexicon.STOPWORDS_ZH and len(old) >= 2 and len(new) >= 2
            assert lexicon.pos_class(lexicon.chinese_pos(new)) == lexicon.pos_class(lexicon.chinese_pos(old))
            replaced.add(old)
    assert replaced and replaced <= {"好看", "电影"}  # 北京 is a place name, 看/想/去 single characters


def test_the_method_changes_only_user_turns():
    example = Example([Message("system", "Classify the request."), Message("user", EN),
                       Message("assistant", "PlayMusic"), Message("user", "and then turn the volume up"),
                       Message("assistant", "SetVolume")], "d.jsonl", 4, label="PlayMusic")
    augment = get_method("eda").make({"ops": ["sr"]}, Resources())
    candidates = augment(example, 3, random.Random(0), EN_KEEP)
    assert len(candidates) == 3
    for c in candidates:
        assert [m.role for m in c.example.messages] == [m.role for m in example.messages]
        for i in (0, 2, 4):
            assert c.example.messages[i].content == example.messages[i].content
        assert c.example.label == "PlayMusic" and c.params["op"] == "sr"
    assert any(c.example.messages[1].content != EN for c in candidates)
    with pytest.raises(ValueError, match="ops is empty"):
        get_method("eda").make({"ops": []}, Resources())
    with pytest.raises(ValueError):
        get_method("eda").make({"alpha": 0.1}, Resources())  # unknown option


def test_missing_wordnet_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    monkeypatch.setattr(lexicon, "WORDNET_DEBIAN", tmp_path / "none")
    lexicon.wordnet.cache_clear()
    lexicon.english_synonyms.cache_clear()
    try:
        with pytest.raises(AugmentError, match="make lexicons") as info:
            run("play some good music", "sr", 0, [], False)
        assert "wordnet-base" in str(info.value)
    finally:
        lexicon.wordnet.cache_clear()
        lexicon.english_synonyms.cache_clear()


def test_chinese_swap_moves_content_words_of_one_class_only():
    swapped = 0
    for seed in range(40):
        _, changed = run("如果电量低于二十并且启动车辆，就打电话给妈妈", "rs", seed, [], True, alpha_rs=0.3)
        for a, b in changed:
            assert a not in lexicon.STOPWORDS_ZH and b not in lexicon.STOPWORDS_ZH
            assert {a, b}.isdisjoint({"如果", "并且", "就"})  # conjunctions and adverbs stay where they are
            assert lexicon.pos_class(lexicon.chinese_pos(a)) == lexicon.pos_class(lexicon.chinese_pos(b)) != ""
            swapped += 1
    assert swapped


def test_english_names_stay_and_the_first_word_keeps_its_capital():
    text = "Will it be hotter on the Isle of Man at lunch?"
    for op in ("sr", "rs", "rd"):
        for seed in range(25):
            new, changed = run(text, op, seed, [], False, alpha_sr=0.5, alpha_rs=0.5, p_rd=0.5)
            assert re.findall(r"\b(?:Isle|Man)\b", new) == ["Isle", "Man"]
            assert {"Isle", "Man"}.isdisjoint({re.sub(r"\W", "", w) for pair in changed for w in pair})
            if op == "rs":
                assert new[:1].isupper() and sum(w[:1].isupper() for w in new.split()) == 3
    assert "one" in lexicon.STOPWORDS_EN  # numbers are not replaced ("one" -> "ane")
