"""LLM augmentation (back-translation, paraphrase, dialogue) and the label-consistency filter.

Prompts and the candidates built from the model's text are checked with a scripted ``sample``;
determinism and the real generation path on the tiny random model; one slow test on SmolLM2.
"""

from __future__ import annotations

import random

import pytest

from fewtune.augment import consistency, llm
from fewtune.augment.base import AugmentError, Resources
from fewtune.augment.methods import get_method
from fewtune.data.formats import Example, Message

EN = Example([Message("system", "Classify."), Message("user", "play jazz by Miles Davis"),
              Message("assistant", "PlayMusic")], "d.jsonl", 3, label="PlayMusic")
ZH = Example([Message("user", "打开空调"), Message("assistant", '{"actions": ["打开空调"]}')], "c.jsonl", 1)
CHAT = Example([Message("user", "What is the capital of France?"), Message("assistant", "Paris."),
                Message("user", "And of Spain?"), Message("assistant", "Madrid.")], "chat.jsonl", 2)


@pytest.fixture
def scripted(monkeypatch):
    """``llm.sample`` replaced: records each call's conversations, answers from a queue (or echoes)."""
    calls: list[list[list[Message]]] = []
    answers: list[str] = []

    def fake(loaded, conversations, n, rng, temperature, top_p, max_new_tokens):
        calls.append(conversations)
        rng.randrange(2**31)  # as the real one: the rng moves
        return [[answers.pop(0) if answers else f"out {len(calls)}.{j}" for j in range(n)] for _ in conversations]

    monkeypatch.setattr(llm, "sample", fake)
    monkeypatch.setattr(llm, "budget", lambda loaded, text, fixed: 32)
    return calls, answers


def resources():
    return Resources(model="unused", generator=object())


def test_no_model_says_what_to_give():
    for name in ("backtranslate", "paraphrase", "dialogue"):
        with pytest.raises(AugmentError, match="--model"):
            get_method(name).make({}, Resources())


def test_clean_keeps_the_rewrite_alone():
    assert llm.clean('Paraphrase: "Put on some jazz"\nExplanation: ...') == "Put on some jazz"
    assert llm.clean("\n  改写：「打开空调」") == "打开空调"
    assert llm.clean("plain text") == "plain text"
    assert llm.clean("   \n") == ""


def test_backtranslate_two_calls_pivot_and_user_turns_only(scripted):
    calls, answers = scripted
    answers += ["Spiel Jazz von Miles Davis", "Spiele Jazz", "Translation: play some jazz by Miles Davis",
                "jazz by Miles Davis please"]
    augment = get_method("backtranslate").make({}, resources())
    cands = augment(EN, 2, random.Random(0), ["PlayMusic"])
    assert len(calls) == 2  # source -> pivot (both samples at once), then both back
    forward, back = calls
    assert "German" in forward[0][-1].content and "play jazz by Miles Davis" in forward[0][-1].content
    assert [c[-1].content.endswith(t) for c, t in zip(back, ["Spiel Jazz von Miles Davis", "Spiele Jazz"])] == [True] * 2
    assert "into English" in back[0][-1].content
    assert [c.example.messages[1].content for c in cands] == ["play some jazz by Miles Davis", "jazz by Miles Davis please"]
    assert [c.params for c in cands] == [{"pivot": "German", "via": "Spiel Jazz von Miles Davis"},
                                         {"pivot": "German", "via": "Spiele Jazz"}]
    for cand in cands:  # system prompt, target and label untouched
        assert cand.example.messages[0] == EN.messages[0] and cand.example.messages[2] == EN.messages[2]
        assert cand.example.label == "PlayMusic"


def test_backtranslate_chinese_goes_through_english_and_names_kept_phrases(scripted):
    calls, _ = scripted
    augment = get_method("backtranslate").make({}, resources())
    cands = augment(ZH, 1, random.Random(0), ["打开空调"])
    forward, back = calls
    assert "into English" in forward[0][-1].content and '"打开空调"' in forward[0][-1].content
    assert "翻译成中文" in back[0][-1].content and '"打开空调"' in back[0][-1].content
    assert cands[0].params["pivot"] == "English"
    assert get_method("backtranslate").make({"pivot": "ja"}, resources())(ZH, 1, random.Random(0), [])[0] \
        .params["pivot"] == "Japanese"


def test_paraphrase_prompt_has_role_examples_and_input(scripted):
    calls, answers = scripted
    answers += ['"put on Miles Davis jazz"', "Paraphrase: some Miles Davis jazz", "play Miles Davis"]
    cands = get_method("paraphrase").make({}, resources())(EN, 3, random.Random(0), [])
    (conv,) = calls[0]
    assert conv[0].role == "system" and "same meaning" in conv[0].content
    assert [m.role for m in conv[1:]] == ["user", "assistant", "user", "assistant", "user"]
    assert conv[-1].content == "play jazz by Miles Davis"
    assert [c.example.messages[1].content for c in cands] == ["put on Miles Davis jazz", "some Miles Davis jazz",
                                                               "play Miles Davis"]
    assert all(c.example.reference == "PlayMusic" for c in cands)
    get_method("paraphrase").make({}, resources())(ZH, 1, random.Random(0), ["打开空调"])
    assert "原样保留" in calls[-1][0][0].content and '"打开空调"' in calls[-1][0][0].content


def test_dialogue_vary_user_keeps_every_assistant_turn(scripted):
    calls, answers = scripted
    answers += ["What's France's capital city?"]
    (cand,) = get_method("dialogue").make({"modes": ["vary_user"]}, resources())(CHAT, 1, random.Random(1), [])
    turn = cand.params["turn"]
    assert cand.params["mode"] == "vary_user" and CHAT.messages[turn].role == "user"
    assert [m.content for m in cand.example.messages if m.role == "assistant"] == ["Paris.", "Madrid."]
    changed = [i for i, (a, b) in enumerate(zip(cand.example.messages, CHAT.messages)) if a.content != b.content]
    assert changed == [turn]


def test_dialogue_new_turn_appends_an_untrained_exchange(scripted):
    calls, answers = scripted
    answers += ["Question: And of Italy?", "Rome."]
    (cand,) = get_method("dialogue").make({"modes": ["new_turn"]}, resources())(CHAT, 1, random.Random(0), [])
    msgs = cand.example.messages
    assert msgs[:4] == CHAT.messages and len(msgs) == 6
    assert (msgs[4].role, msgs[4].content) == ("user", "And of Italy?")
    assert (msgs[5].role, msgs[5].content, msgs[5].weight) == ("assistant", "Rome.", 0.0)
    assert calls[1][0][-1].content == "And of Italy?"  # the reply answers the new question in context
    answers += ["And of Italy?", "Rome."]
    (opted,) = get_method("dialogue").make({"modes": ["new_turn"], "train_generated": True}, resources())(
        CHAT, 1, random.Random(0), [])
    assert opted.example.messages[5].weight is None
    # a labelled example is not extended: its label answers the original last turn
    assert get_method("dialogue").make({"modes": ["new_turn"]}, resources())(EN, 2, random.Random(0), []) == []


def test_dialogue_rejects_unknown_modes():
    with pytest.raises(AugmentError, match="recombine"):
        get_method("dialogue").make({"modes": ["recombine"]}, resources())


def test_real_generation_is_deterministic_by_rng(tiny_model):
    res = Resources(model=tiny_model)
    augment = get_method("paraphrase").make({"max_new_tokens": 8}, res)
    a = augment(EN, 2, random.Random(5), [])
    assert a  # random weights still write something
    loaded = res.generator
    assert loaded is not None  # loaded once, kept for the next calls
    b = augment(EN, 2, random.Random(5), [])
    assert res.generator is loaded
    assert [c.example.to_dict() for c in a] == [c.example.to_dict() for c in b]
    back = get_method("backtranslate").make({"max_new_tokens": 8}, res)
    x, y = back(ZH, 1, random.Random(2), []), back(ZH, 1, random.Random(2), [])
    assert [c.params for c in x] == [c.params for c in y]
    assert all(c.example.reference == ZH.reference for c in x)


# ---------------------------------------------------------------- label consistency


def planted(monkeypatch, probs):
    monkeypatch.setattr(consistency.LabelConsistency, "probabilities", lambda self, convs: probs[:len(convs)])


def test_consistency_rejects_only_confident_label_changes(monkeypatch):
    labels = ["GetWeather", "PlayMusic"]
    judge = consistency.LabelConsistency("unused", labels, threshold=0.8)
    src = [EN, EN, EN]
    planted(monkeypatch, [[0.93, 0.07], [0.6, 0.4], [0.1, 0.9]])
    assert judge.check(src, [EN, EN, EN]) == ["label changed: PlayMusic -> GetWeather (p=0.93)", None, None]
    planted(monkeypatch, [[0.8, 0.2]])
    assert judge.check([EN], [EN]) == ["label changed: PlayMusic -> GetWeather (p=0.80)"]
    assert judge.check([], []) == []
    with pytest.raises(ValueError):
        judge.check([EN], [])
    with pytest.raises(AugmentError):
        consistency.LabelConsistency("unused", [], threshold=0.8)


def test_consistency_scores_a_real_model(tiny_model):
    labels = ["GetWeather", "PlayMusic", "BookRestaurant"]
    judge = consistency.LabelConsistency(tiny_model, labels, threshold=0.34)
    probs = judge.probabilities([EN.prompt_messages, ZH.prompt_messages])
    assert len(probs) == 2 and all(len(p) == 3 for p in probs)
    assert all(abs(sum(p) - 1) < 1e-6 and all(0 < v < 1 for v in p) for p in probs)
    reasons = judge.check([EN], [EN])
    best = max(range(3), key=probs[0].__getitem__)
    expected = None if labels[best] == "PlayMusic" or probs[0][best] < 0.34 else \
        f"label changed: PlayMusic -> {labels[best]} (p={probs[0][best]:.2f})"
    assert reasons == [expected]


@pytest.mark.slow
def test_smollm2_paraphrase_and_backtranslate():
    res = Resources(model="smollm2-135m-instruct")
    para = get_method("paraphrase").make({}, res)(EN, 2, random.Random(0), [])
    assert para and all(c.example.messages[1].content.strip() for c in para)
    assert all(c.example.reference == "PlayMusic" for c in para)
    back = get_method("backtranslate").make({}, res)(EN, 1, random.Random(0), [])
    assert back and back[0].params["pivot"] == "German" and back[0].params["via"]


@pytest.fixture(scope="module")
def tiny_translator(tmp_path_factory):
    """A translation model folder as a user would bring one (to/ and back/, seq2seq): tiny random MarianMT
    models with a real tokenizer, so the path through AutoModelForSeq2SeqLM runs (the output is noise)."""
    import torch
    from transformers import MarianConfig, MarianMTModel

    from fewtune.models import DEFAULT_MODEL, load_tokenizer

    tok = load_tokenizer(DEFAULT_MODEL)
    root = tmp_path_factory.mktemp("marian")
    for part in ("to", "back"):
        torch.manual_seed(1)
        config = MarianConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                              encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                              decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
                              forced_eos_token_id=tok.eos_token_id)
        MarianMTModel(config).save_pretrained(root / part)
        tok.save_pretrained(root / part)
    return root


def test_backtranslate_through_a_translation_model_folder(tiny_translator, tmp_path):
    method = get_method("backtranslate")
    augment = method.make({"translator": str(tiny_translator), "max_new_tokens": 12}, Resources())
    a = augment(EN, 2, random.Random(5), [])
    b = augment(EN, 2, random.Random(5), [])
    assert a and [c.example.messages[1].content for c in a] == [c.example.messages[1].content for c in b]
    for cand in a:
        assert cand.params["pivot"] == "German" and isinstance(cand.params["via"], str)
        assert cand.example.messages[0] == EN.messages[0] and cand.example.messages[2] == EN.messages[2]
    with pytest.raises(AugmentError, match="to/ .* and back/"):
        method.make({"translator": str(tmp_path)}, Resources())
