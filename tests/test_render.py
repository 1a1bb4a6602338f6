import pytest

from fewtune.data.formats import Message
from fewtune.data.render import RenderError, Template, render_conversation

CHAT = [Message("user", "打开车窗和空调"), Message("assistant", '{"actions":["打开车窗","打开空调"]}')]
MULTI = [Message("system", "s"), Message("user", "u1"), Message("assistant", "a1"), Message("user", "u2"),
         Message("assistant", "a2")]


def weighted_text(tok, rendered, min_weight=1.0):
    return tok.decode([i for i, w in zip(rendered.input_ids, rendered.loss_weights) if w >= min_weight])


@pytest.mark.parametrize("kind", ["chat", "plain"])
@pytest.mark.parametrize("conversation", [CHAT, MULTI])
def test_inference_prompt_equals_training_prompt(tokenizer, kind, conversation):
    template = Template.for_tokenizer(tokenizer, kind, system_prompt="Parse to JSON.")
    train = render_conversation(conversation, tokenizer, template)
    prompt = render_conversation(conversation, tokenizer, template, for_generation=True)
    # the tokens the model is trained on before its last answer are exactly the inference prompt
    first_target = next(i for i in range(len(train.loss_weights) - 1, -1, -1) if train.loss_weights[i] == 0) + 1
    assert prompt.input_ids == train.input_ids[:first_target]
    assert len(prompt) < len(train)
    # and an inference prompt built from the conversation without its answer is the same
    same = render_conversation(conversation[:-1], tokenizer, template, for_generation=True)
    assert same.input_ids == prompt.input_ids


def test_only_assistant_tokens_carry_loss(tokenizer):
    template = Template.for_tokenizer(tokenizer, "chat")
    rendered = render_conversation(CHAT, tokenizer, template)
    assert weighted_text(tokenizer, rendered) == CHAT[1].content + "<|im_end|>\n"
    assert set(rendered.loss_weights) == {0.0, 1.0}


def test_plain_template_separator_and_stop(tokenizer):
    template = Template.for_tokenizer(tokenizer, "plain", separator="\n\n###\n\n", stop=" END")
    rendered = render_conversation(CHAT, tokenizer, template)
    assert tokenizer.decode(rendered.input_ids) == CHAT[0].content + "\n\n###\n\n" + CHAT[1].content + " END"
    assert weighted_text(tokenizer, rendered) == CHAT[1].content + " END"
    assert template.stop_strings(tokenizer) == [" END"]


def test_prompt_loss_weight_is_fractional(tokenizer):
    template = Template.for_tokenizer(tokenizer, "chat")
    plain = render_conversation(CHAT, tokenizer, template)
    weighted = render_conversation(CHAT, tokenizer, template, prompt_loss_weight=0.1)
    assert weighted.input_ids == plain.input_ids
    assert sorted(set(weighted.loss_weights)) == [0.1, 1.0]
    assert [w == 0.1 for w in weighted.loss_weights] == [w == 0.0 for w in plain.loss_weights]


def test_multi_turn_and_message_weights(tokenizer):
    template = Template.for_tokenizer(tokenizer, "chat")
    conv = [Message("user", "u1"), Message("assistant", "a1", weight=0.0), Message("user", "u2"), Message("assistant", "a2")]
    rendered = render_conversation(conv, tokenizer, template)
    assert weighted_text(tokenizer, rendered) == "a2<|im_end|>\n"
    conv[1].weight = None
    both = render_conversation(conv, tokenizer, template)
    assert weighted_text(tokenizer, both) == "a1<|im_end|>\na2<|im_end|>\n"


def test_truncation_is_reported(tokenizer):
    template = Template.for_tokenizer(tokenizer, "chat")
    full = render_conversation(CHAT, tokenizer, template)
    cut = render_conversation(CHAT, tokenizer, template, max_length=10)
    assert cut.truncated and len(cut) == 10 and cut.input_ids == full.input_ids[:10]
    assert sum(cut.loss_weights) == 0 and cut.trainable_before_truncation > 0


def test_system_prompt_only_when_missing(tokenizer):
    template = Template.for_tokenizer(tokenizer, "chat", system_prompt="DEFAULT")
    assert "DEFAULT" in tokenizer.decode(render_conversation(CHAT, tokenizer, template).input_ids)
    assert "DEFAULT" not in tokenizer.decode(render_conversation(MULTI, tokenizer, template).input_ids)


def test_template_round_trip(tmp_path, tokenizer):
    template = Template.for_tokenizer(tokenizer, "auto", system_prompt="x")
    template.save(tmp_path / "t.json")
    assert Template.load(tmp_path / "t.json") == template and template.kind == "chat"
    with pytest.raises(RenderError):
        Template.for_tokenizer(tokenizer, "plain", separator="")


def test_completion_cut_away_is_caught_even_with_prompt_loss(tokenizer, tmp_path):
    from fewtune.config import DataSection
    from fewtune.data.dataset import render_set
    from fewtune.data.formats import DataError, Example

    template = Template.for_tokenizer(tokenizer, "chat")
    long_prompt = [Message("user", "很长的提示" * 30), Message("assistant", "答案")]
    cut = render_conversation(long_prompt, tokenizer, template, max_length=20, prompt_loss_weight=0.5)
    assert sum(cut.loss_weights) > 0 and cut.completion_tokens == 0 and cut.completion_tokens_before_truncation > 0
    data = DataSection(max_length=20, prompt_loss_weight=0.5)
    with pytest.raises(DataError, match="cut away entirely"):
        render_set([Example(long_prompt, "f.jsonl", 7)], tokenizer, template, data, "training")


def test_openai_tool_calls_and_non_text_parts(tmp_path):
    import json

    from fewtune.data.formats import DataError, load_examples

    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}}]
    row = {"messages": [{"role": "user", "content": "北京天气"}, {"role": "assistant", "content": None, "tool_calls": calls}]}
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert json.loads(load_examples(path)[0].reference) == calls
    audio = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this"},
                                                        {"type": "input_audio", "input_audio": {"data": ""}}]},
                          {"role": "assistant", "content": "a cat"}]}
    path.write_text(json.dumps(audio) + "\n")
    with pytest.raises(DataError, match="text and image parts are supported") as info:  # image parts: test_vision
        load_examples(path)
    assert info.value.field == "messages[0].content"
