"""`fewtune augment`'s pipeline: what is kept, what is rejected and why, provenance, order, leakage.

The methods here are test-only registry entries with known behaviour, so each filter is tested on
its own; the real methods have their own tests (test_augment_eda.py, test_augment_noise.py, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fewtune.augment import base
from fewtune.augment.base import AugmentMethod, Candidate, Options, augmentable_turns, with_turns
from fewtune.augment.pipeline import AugmentSettings, augment_file, length_ratio, similarity
from fewtune.augment.spans import protected_spans, split_protected
from fewtune.cli import app
from fewtune.data.collect import collect
from tests.conftest import write_jsonl


class FakeOptions(Options):
    mode: str = "suffix"  # suffix | same | upper | drop_first_span | replace | copy_other
    text: str = ""


def build_fake(options: FakeOptions, resources):
    """suffix: append ' variant K' to each user turn (K from the rng); the other modes make one kind of bad candidate."""

    def augment(example, n, rng, protected):
        out = []
        for k in range(n):
            new = {}
            for i in augmentable_turns(example):
                text = example.messages[i].content
                if options.mode == "suffix":
                    new[i] = f"{text} variant {rng.randrange(10**6)}"
                elif options.mode == "same":
                    new[i] = text
                elif options.mode == "upper":  # differs only in case: a near-duplicate
                    new[i] = text.upper() + "!"
                elif options.mode == "drop_first_span":
                    new[i] = text.replace(protected[0], "") if protected else text + " x"
                elif options.mode == "replace":
                    new[i] = options.text
            out.append(Candidate(with_turns(example, new), {"mode": options.mode, "k": k}))
        return out

    return augment


@pytest.fixture
def fake_method(monkeypatch):
    monkeypatch.setitem(base.AUGMENT_METHODS, "fake", AugmentMethod("fake", "text", FakeOptions,
                                                                     f"{__name__}:build_fake"))
    monkeypatch.setitem(base.AUGMENT_METHODS, "fake2", AugmentMethod("fake2", "text", FakeOptions,
                                                                      f"{__name__}:build_fake"))
    return "fake"


CLASSIFICATION = [{"text": "play some jazz music", "label": "PlayMusic"},
                  {"text": "what is the weather in paris", "label": "GetWeather"},
                  {"text": "book a table for two", "label": "BookRestaurant"}]
CAR = [{"prompt": "如果下雨的时候，就打开雨刷和关闭车窗",
        "completion": json.dumps({"conditions": ["下雨"], "actions": ["打开雨刷", "关闭车窗"]}, ensure_ascii=False)},
       {"prompt": "请播放新闻", "completion": json.dumps({"actions": ["播放新闻"]}, ensure_ascii=False)}]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_originals_kept_in_order_each_followed_by_its_augmentations_with_provenance(tmp_path, fake_method):
    src = write_jsonl(tmp_path / "train.jsonl", CLASSIFICATION)
    result = augment_file(src, tmp_path / "aug.jsonl", AugmentSettings(["fake"], per_example=2), progress=False)
    rows = _lines(result.out)
    assert [r for r in rows if "augment" not in r] == CLASSIFICATION  # the originals, untouched and in order
    assert len(rows) == 3 + 6
    for i, original in enumerate(CLASSIFICATION):
        block = rows[i * 3:(i + 1) * 3]
        assert block[0] == original
        for aug in block[1:]:
            assert aug["label"] == original["label"]  # the label never changes
            assert aug["text"].startswith(original["text"] + " variant ")
            assert aug["augment"]["method"] == "fake"
            assert aug["augment"]["source"] == {"file": str(src), "line": i + 1}
            assert aug["augment"]["params"]["mode"] == "suffix"
    # the output is itself a valid data set of the same format (the provenance field does not disturb the reader)
    again = collect(result.out)
    assert again.fmt == "classification" and len(again.examples) == 9 and not again.problems
    summary = json.loads(result.summary_path.read_text())
    assert summary["methods"]["fake"] == {"generated": 6, "kept": 6, "rejected": {}}


def test_same_seed_same_output_other_seed_other_output(tmp_path, fake_method):
    src = write_jsonl(tmp_path / "train.jsonl", CLASSIFICATION)
    a = augment_file(src, tmp_path / "a.jsonl", AugmentSettings(["fake"], seed=1), progress=False)
    b = augment_file(src, tmp_path / "b.jsonl", AugmentSettings(["fake"], seed=1), progress=False)
    c = augment_file(src, tmp_path / "c.jsonl", AugmentSettings(["fake"], seed=2), progress=False)
    assert a.out.read_text() == b.out.read_text()
    assert [r["text"] for r in _lines(a.out)] != [r["text"] for r in _lines(c.out)]


def test_adding_a_method_does_not_change_another_methods_output(tmp_path, fake_method):
    src = write_jsonl(tmp_path / "train.jsonl", CLASSIFICATION)
    alone = augment_file(src, tmp_path / "a.jsonl", AugmentSettings(["fake"]), progress=False)
    both = augment_file(src, tmp_path / "b.jsonl", AugmentSettings(["fake", "fake2"]), progress=False)
    fake_rows = lambda path: [r for r in _lines(path) if r.get("augment", {}).get("method") == "fake"]  # noqa: E731
    assert fake_rows(alone.out) == fake_rows(both.out)


@pytest.mark.parametrize("mode, reason", [("same", "unchanged"), ("upper", "unchanged")])
def test_unchanged_and_near_identical_candidates_are_rejected(tmp_path, fake_method, mode, reason):
    src = write_jsonl(tmp_path / "train.jsonl", CLASSIFICATION)
    result = augment_file(src, tmp_path / "aug.jsonl", AugmentSettings(["fake"], options={"fake": {"mode": mode}}),
                          progress=False)
    assert _lines(result.out) == CLASSIFICATION
    rejects = _lines(result.rejects)
    assert len(rejects) == 3 and {r["reason"] for r in rejects} == {reason}
    assert rejects[0]["augment"]["source"]["line"] == 1 and "text" in rejects[0]
    assert result.counts["fake"].rejected == {reason: 3}


def test_a_copy_of_another_original_and_a_repeat_are_duplicates(tmp_path, fake_method):
    src = write_jsonl(tmp_path / "train.jsonl", CLASSIFICATION)
    settings = AugmentSettings(["fake"], per_example=2, options={"fake": {"mode": "replace", "text": "Book a table for two."}})
    result = augment_file(src, tmp_path / "aug.jsonl", settings, progress=False)
    reasons = [r["reason"] for r in _lines(result.rejects)]
    # examples 1 and 2: the text is the third original (near-duplicate: case, punctuation); example 3: unchanged
    assert reasons.count("duplicate of an original") == 4 and reasons.count("unchanged") == 2
    settings.options["fake"]["text"] = "something else entirely"
    result = augment_file(src, tmp_path / "aug2.jsonl", settings, progress=False)
    assert len([r for r in _lines(result.out) if "augment" in r]) == 1  # the first is kept, every repeat rejected
    assert result.counts["fake"].rejected == {"duplicate of another augmentation": 5}


def test_an_augmentation_matching_a_test_input_is_rejected_as_leakage(tmp_path, fake_method):
    src = write_jsonl(tmp_path / "train.jsonl", CLASSIFICATION[:1])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "Play some JAZZ music, please", "label": "PlayMusic"}])
    settings = AugmentSettings(["fake"], exclude=[str(test)],
                               options={"fake": {"mode": "replace", "text": "play some jazz music please"}})
    result = augment_file(src, tmp_path / "aug.jsonl", settings, progress=False)
    assert [r["reason"] for r in _lines(result.rejects)] == ["leaks into an excluded file"]
    assert _lines(result.out) == CLASSIFICATION[:1]
    # and `data check --val` on the output finds no leakage
    from fewtune.quality.check import check_data

    report = check_data(result.out, test, tokens=False, progress=False)
    assert report.stats["validation"]["leakage"]["leaked_inputs"] == 0
    # while the rejected candidate itself would have leaked
    leaky = write_jsonl(tmp_path / "leaky.jsonl", [{"text": "play some jazz music please", "label": "PlayMusic"}])
    assert check_data(leaky, test, tokens=False, progress=False).stats["validation"]["leakage"]["leaked_inputs"] == 1


def test_extraction_targets_quoted_strings_are_protected(tmp_path, fake_method):
    spans = protected_spans(collect(write_jsonl(tmp_path / "c.jsonl", CAR)).examples[0])
    assert spans == ["关闭车窗", "打开雨刷", "下雨"]
    src = write_jsonl(tmp_path / "car.jsonl", CAR)
    result = augment_file(src, tmp_path / "aug.jsonl",
                          AugmentSettings(["fake"], options={"fake": {"mode": "drop_first_span"}}), progress=False)
    assert {r["reason"] for r in _lines(result.rejects)} == {"protected span lost"}
    assert result.counts["fake"].kept == 0


def test_target_strings_said_otherwise_keep_their_pieces():
    from fewtune.data.formats import Example, Message

    def spans(prompt, target):
        return protected_spans(Example([Message("user", prompt), Message("assistant", json.dumps(
            target, ensure_ascii=False))], "c.jsonl", 1))

    # "关闭香氛和氛围灯" says 关闭氛围灯 with 关闭 shared: both of its pieces must stay, or the target no longer fits
    assert spans("当熄火时，就关闭香氛和氛围灯一下", {"conditions": ["熄火"], "actions": ["关闭香氛", "关闭氛围灯"]}) == [
        "关闭香氛", "氛围灯", "关闭", "熄火"]
    assert spans("book a table at luigi's tonight", {"place": "Luigi's Pizzeria", "when": "tonight"}) == ["tonight"]
    assert spans("play songs by the Rolling Stones now", {"artist": "The Rolling Stones"}) == ["Rolling Stones"]
    assert spans("play the beatles", {"artist": "The Beatles"}) == []  # no whole word in common ("eatles")


def test_split_protected_keeps_spans_whole_and_text_intact():
    text = "如果下雨的时候，就打开雨刷和关闭车窗"
    pieces = split_protected(text, ["打开雨刷", "下雨", "关闭车窗"])
    assert "".join(p for p, _ in pieces) == text
    assert [p for p, locked in pieces if locked] == ["下雨", "打开雨刷", "关闭车窗"]


def test_generation_examples_that_drift_off_are_rejected(tmp_path, fake_method):
    rows = [{"prompt": "summarise the meeting notes from monday", "completion": "ok"}]
    src = write_jsonl(tmp_path / "gen.jsonl", rows)
    far = AugmentSettings(["fake"], options={"fake": {"mode": "replace", "text": "a cat sat on my warm mat by the door"}})
    assert augment_file(src, tmp_path / "a.jsonl", far, progress=False).counts["fake"].rejected == {
        "too different from its source": 1}
    near = AugmentSettings(["fake"], options={"fake": {"mode": "replace", "text": "summarize the notes of monday's meeting"}})
    assert augment_file(src, tmp_path / "b.jsonl", near, progress=False).counts["fake"].kept == 1
    assert similarity("今天天气很好", "今天天气不错") > similarity("今天天气很好", "我要去机场")


def _replaced(tmp_path, rows, text, name, **settings):
    src = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    aug = AugmentSettings(["fake"], options={"fake": {"mode": "replace", "text": text}}, **settings)
    return augment_file(src, tmp_path / f"{name}.aug.jsonl", aug, progress=False).counts["fake"]


@pytest.mark.parametrize("source, text, kept", [
    ("play some jazz music", "我们可以在确定有效的材料上播放", False),  # an LLM answering English in Chinese
    ("play some jazz music", "play some jazz 音乐", False),  # Chinese creeping into an English input
    ("帮我播放一首周杰伦的歌", "play a song by Jay Chou for me", False),  # a round trip that never came back
    ("帮我播放一首周杰伦的歌", "帮我放一首周杰伦的歌曲", True),
    ("播放Spotify上的新歌", "在Spotify上播放新歌", True),  # English words inside Chinese stay Chinese
])
def test_labelled_augmentations_in_another_language_are_rejected(tmp_path, fake_method, source, text, kept):
    counts = _replaced(tmp_path, [{"text": source, "label": "PlayMusic"}], text, "lang")
    assert (counts.kept, dict(counts.rejected)) == ((1, {}) if kept else (0, {"another language than its source": 1}))


def test_labelled_augmentations_far_longer_or_shorter_are_rejected(tmp_path, fake_method):
    rows = [{"text": "book Pollen Street Social in South Dartmouth this morning", "label": "BookRestaurant"}]
    ramble = ("I'm glad you're planning to book Pollen Street Social in South Dartmouth this morning. "
              "Unfortunately, I don't have the exact details of the restaurant, but I can help you find it.")
    assert dict(_replaced(tmp_path, rows, ramble, "long").rejected) == {"length far from its source": 1}
    assert dict(_replaced(tmp_path, rows, "book it", "short").rejected) == {"length far from its source": 1}
    assert _replaced(tmp_path, rows, "reserve Pollen Street Social in South Dartmouth for this morning please",
                     "near").kept == 1
    assert _replaced(tmp_path, rows, ramble, "off", max_length_ratio=0).kept == 1  # 0 turns the check off
    # a short input may gain or lose a word: the slack keeps 'play jazz' -> 'um play jazz'
    assert _replaced(tmp_path, [{"text": "play jazz", "label": "PlayMusic"}], "um play jazz", "slack").kept == 1
    res = CliRunner().invoke(app, ["augment", str(tmp_path / "long.jsonl"), "--out", str(tmp_path / "cli.jsonl"),
                                   "-m", "fake", "--set", "fake.mode=replace", "--set", f"fake.text={ramble}",
                                   "--max-length-ratio", "5"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "cli.summary.json").read_text())["methods"]["fake"]["kept"] == 1


def test_length_ratio_leaves_out_the_turns_a_dialogue_extension_adds(tmp_path):
    turn = [{"role": "user", "content": "what is the weather in paris"}, {"role": "assistant", "content": "sunny"}]
    more = [{"role": "user", "content": "and tomorrow, will it rain in paris or stay dry all day long?"},
            {"role": "assistant", "content": "dry"}]
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turn}, {"messages": turn + more},
                                                {"messages": [turn[0] | {"content": "weather paris"}, turn[1]]}])
    one, two, short = collect(src).examples
    assert length_ratio(one, two) == 1.0
    assert length_ratio(one, short) == pytest.approx((12 + 5) / (23 + 5))


def test_only_new_and_field_names_of_the_file(tmp_path, fake_method):
    rows = [{"sentence": r["text"], "label": r["label"]} for r in CLASSIFICATION]
    src = write_jsonl(tmp_path / "renamed.jsonl", rows)
    from fewtune.data.tools import load_checked  # noqa: F401  (the rename goes through the checking reader)

    result = augment_file(src, tmp_path / "aug.jsonl", AugmentSettings(["fake"], only_new=True),
                          rename={"text": "sentence"}, progress=False)
    out = _lines(result.out)
    assert len(out) == 3 and all("sentence" in r and "text" not in r and "augment" in r for r in out)


def test_cli_writes_out_rejects_and_summary_and_prints_the_table(tmp_path, fake_method):
    src = write_jsonl(tmp_path / "train.jsonl", CLASSIFICATION)
    res = CliRunner().invoke(app, ["augment", str(src), "--out", str(tmp_path / "aug.jsonl"), "--methods", "fake,fake2",
                                   "--set", "fake2.mode=same", "--per-example", "2"])
    assert res.exit_code == 0, res.output
    assert "fake2" in res.output and "unchanged" in res.output
    summary = json.loads((tmp_path / "aug.summary.json").read_text())
    assert summary["methods"]["fake"]["kept"] == 6 and summary["methods"]["fake2"]["rejected"] == {"unchanged": 6}
    assert len(_lines(tmp_path / "aug.rejects.jsonl")) == 6


@pytest.mark.parametrize("args, message", [
    (["--methods", "nosuch"], "unknown augmentation method 'nosuch'"),
    (["--methods", "fake", "--set", "fake.nosuch=1"], "nosuch"),
    (["--methods", "fake", "--set", "fake=1"], "expected METHOD.OPTION=VALUE"),
    ([], "no augmentation method given"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, fake_method, args, message):
    src = write_jsonl(tmp_path / "train.jsonl", CLASSIFICATION)
    res = CliRunner().invoke(app, ["augment", str(src), "--out", str(tmp_path / "aug.jsonl"), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not (tmp_path / "aug.jsonl").exists()
