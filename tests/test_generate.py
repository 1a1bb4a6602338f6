import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from fewtune.cli import app
from fewtune.config import GenerateSection
from fewtune.data.formats import Message
from fewtune.generate import cut_at_stop, generate, load_for_inference
from fewtune.train.loop import train

runner = CliRunner()


def test_cut_at_stop():
    assert cut_at_stop('{"a":1} END more END', [" END"]) == '{"a":1}'
    assert cut_at_stop("abc<|im_end|>x", [" END", "<|im_end|>"]) == "abc"
    assert cut_at_stop("no stop", [" END"]) == "no stop"


def test_batched_left_padded_generation_equals_one_by_one(tiny_model):
    loaded = load_for_inference(tiny_model)
    prompts = [[Message("user", "打开车窗")], [Message("user", "a much longer prompt than the first one, with words")]]
    gen = GenerateSection(max_new_tokens=6, batch_size=2)
    batched = generate(loaded, prompts, gen, progress=False)
    single = [generate(loaded, [p], gen.model_copy(update={"batch_size": 1}), progress=False)[0] for p in prompts]
    assert batched == single and all(len(o) == 1 for o in batched)


def test_sampling_options(tiny_model):
    loaded = load_for_inference(tiny_model)
    gen = GenerateSection(max_new_tokens=5, temperature=1.0, top_k=50, top_p=0.9, num_return_sequences=3, seed=1)
    first = generate(loaded, [[Message("user", "hi")]], gen, progress=False)
    again = generate(loaded, [[Message("user", "hi")]], gen, progress=False)
    assert len(first[0]) == 3 and first == again  # seeded


def test_stop_strings_end_generation(tiny_model):
    loaded = load_for_inference(tiny_model)
    # seeded sampling: a random tiny model's greedy output is just repeated newlines
    gen = GenerateSection(max_new_tokens=12, temperature=1.0, seed=0)
    free = generate(loaded, [[Message("user", "x")]], gen, progress=False)[0][0]
    assert len(free) > 6
    # two characters from inside the text, no space in them (the output is stripped; the raw text may start
    # with a space, so a stop such as " e" could first occur before what the stripped text shows)
    at = next(i for i in range(4, len(free) - 1) if not free[i].isspace() and not free[i + 1].isspace())
    stop = free[at:at + 2]
    cut = generate(loaded, [[Message("user", "x")]], gen.model_copy(update={"stop": [stop]}), progress=False)[0][0]
    assert cut == free[: free.find(stop)].strip() and stop not in cut


def test_lora_merge_equals_adapter_outputs(make_config, tmp_path):
    from transformers import AutoModelForCausalLM

    result = train(make_config(train__max_steps=3, train__lr=1e-2))
    out = runner.invoke(app, ["export", str(result.run_dir), "--merged", str(tmp_path / "merged")])
    assert out.exit_code == 0, out.output
    adapter = load_for_inference(str(result.run_dir), precision="no").model  # fp32, as the export is
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not hasattr(merged, "peft_config")
    ids = torch.randint(0, 2000, (2, 16))
    with torch.no_grad():
        a = adapter(input_ids=ids).logits
        b = merged(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(make_config().model.name)(input_ids=ids).logits
    assert (a - base).abs().max() > 1e-3  # the adapter changed something
    assert (a - b).abs().max() < 1e-4
    in_memory = load_for_inference(str(result.run_dir), merge=True, precision="no").model  # what eval/generate use
    assert not hasattr(in_memory, "peft_config")
    with torch.no_grad():
        assert (in_memory(input_ids=ids).logits - a).abs().max() < 1e-4


def test_an_explicit_system_prompt_replaces_a_runs_own(make_config):
    """A run whose examples carried different system messages in the data has none in its template: chatting with
    it needs one, so --system (and the UI's field) applies to runs too; without it the run's own is used."""
    from fewtune.data.formats import Message
    from fewtune.generate import prompt_ids

    result = train(make_config(train__max_steps=1, data__system_prompt="训练时的系统提示"))
    user = [Message("user", "打开车窗")]
    own = load_for_inference(str(result.run_dir), precision="no")
    assert "训练时的系统提示" in own.tokenizer.decode(prompt_ids(own, user))
    other = load_for_inference(str(result.run_dir), system_prompt="Classify the request.", precision="no")
    text = other.tokenizer.decode(prompt_ids(other, user))
    assert "Classify the request." in text and "训练时的系统提示" not in text


def test_a_system_message_every_training_example_carried_is_the_runs_default(make_config, tmp_path):
    """Data that carries one system message in every example (no data.system_prompt): the run keeps it in
    template.json, so a bare prompt at inference renders as the training prompts did; examples with different
    system messages leave the run without one."""
    from fewtune.data.formats import load_examples
    from fewtune.data.render import Template, render_conversation
    from fewtune.generate import prompt_ids
    from tests.conftest import write_jsonl

    system = "把车载指令解析为JSON。"
    rows = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"打开车窗{i}"},
                          {"role": "assistant", "content": '{"action": "open"}'}]} for i in range(10)]
    data = write_jsonl(tmp_path / "sys.jsonl", rows)
    result = train(make_config(train__max_steps=1, data__train=json.dumps(str(data)),
                               train__output_dir=json.dumps(str(tmp_path / "sys-run"))))
    assert Template.load(result.run_dir / "template.json").system_prompt == system
    loaded = load_for_inference(str(result.run_dir), precision="no")
    example = load_examples(data)[0]
    trained = render_conversation(example.messages, loaded.tokenizer, loaded.template, 64).input_ids
    asked = prompt_ids(loaded, example.prompt_messages[1:])  # the user's text alone, no system message
    assert trained[:len(asked)] == asked

    rows[0]["messages"][0]["content"] = "Another system message."
    mixed = write_jsonl(tmp_path / "mixed.jsonl", rows)
    result = train(make_config(train__max_steps=1, data__train=json.dumps(str(mixed)),
                               train__output_dir=json.dumps(str(tmp_path / "mixed-run"))))
    assert Template.load(result.run_dir / "template.json").system_prompt is None


def test_cli_train_generate_resume(make_config, tmp_path):
    cfg = make_config(train__max_steps=2)
    config_path = tmp_path / "c.yaml"
    from fewtune.config import save_config

    save_config(cfg, config_path)
    out = runner.invoke(app, ["train", str(config_path), f"train.output_dir={tmp_path / 'cli-run'}"])
    assert out.exit_code == 0, out.output
    assert "run directory" in out.output
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "打开车窗", "completion": "x"}\n{"prompt": "关闭空调"}\n', encoding="utf-8")
    out = runner.invoke(app, ["generate", str(tmp_path / "cli-run"), "--input", str(prompts), "--output",
                              str(tmp_path / "out.jsonl"), "--max-new-tokens", "4"])
    assert out.exit_code == 0, out.output
    rows = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["打开车窗", "关闭空调"] and rows[0]["reference"] == "x"
    out = runner.invoke(app, ["generate", str(tmp_path / "cli-run"), "--prompt", "hi", "--max-new-tokens", "3"])
    assert out.exit_code == 0, out.output
    # resuming a finished run continues nothing and finishes cleanly
    out = runner.invoke(app, ["train", "--resume", str(tmp_path / "cli-run")])
    assert out.exit_code == 0, out.output


def test_cli_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("train:\n  lrr: 1\n")
    out = runner.invoke(app, ["train", str(bad)])
    assert out.exit_code == 2 and "did you mean 'train.lr'" in out.output
    out = runner.invoke(app, ["generate", "no-such-org/no-such-model-xyz", "--prompt", "hi"])
    assert out.exit_code == 2 and "local folder" in out.output


def test_chat_keeps_history(tiny_model):
    out = runner.invoke(app, ["chat", tiny_model, "--max-new-tokens", "3"], input="hello\n/reset\nagain\n/exit\n")
    assert out.exit_code == 0, out.output
    assert out.output.count("bot> ") == 2 and "(history cleared)" in out.output


# ---------------------------------------------------------------- empty and too-long prompts: the policy

import pytest  # noqa: E402

from fewtune.generate import PromptError, check_prompts, context_limit, fit_history  # noqa: E402


@pytest.fixture(scope="module")
def small_context_model(tmp_path_factory, tokenizer) -> str:
    """The tiny Llama with a context of 96 positions: SmolLM2's chat template alone takes 31 of them."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("tiny-96")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_context_limit_is_the_smaller_of_model_and_tokenizer(tiny_model):
    loaded = load_for_inference(tiny_model)
    assert loaded.tokenizer.model_max_length > 10**9  # transformers' "unknown": ignored
    assert context_limit(loaded) == 1024  # the model's max_position_embeddings
    loaded.tokenizer.model_max_length = 300
    assert context_limit(loaded) == 300


def test_empty_prompts_are_refused_before_any_model_is_loaded():
    convs = [[Message("user", "fine")], [Message("user", "  \n\t")], [Message("user", "")]]
    with pytest.raises(PromptError, match=r"^prompt 2 is empty: give some text to answer \(1 more prompt is empty too\)"):
        check_prompts(None, convs, 16)
    with pytest.raises(PromptError, match=r"^q.jsonl line 3 is empty"):
        check_prompts(None, convs[:1] + convs[2:], 16, names=["q.jsonl line 1", "q.jsonl line 3"])


def test_a_prompt_over_the_context_is_refused_with_its_numbers(tiny_model):
    loaded = load_for_inference(tiny_model)
    long = [Message("user", "hello " * 950)]
    n = len(check_prompts(loaded, [long], 0)[0])
    assert 950 < n < 1024
    with pytest.raises(PromptError) as info:  # fits alone, not with the new tokens
        generate(loaded, [[Message("user", "hi")], long], GenerateSection(max_new_tokens=128), progress=False)
    assert str(info.value) == (f"prompt 2 is {n} tokens with the template; with --max-new-tokens 128 that makes "
                               f"{n + 128}, over the "
                               f"model's context of 1024 tokens: shorten the prompt by {n + 128 - 1024} tokens or "
                               f"lower --max-new-tokens to {1024 - n}")
    huge = [Message("user", "hello " * 1100)]
    with pytest.raises(PromptError, match=r"^--prompt 1 is \d+ tokens with the template, over the model's context "
                                          r"of 1024 tokens by itself: shorten it to at most 1016 tokens"):
        check_prompts(loaded, [huge], 8, names=["--prompt 1"])
    assert generate(loaded, [long], GenerateSection(max_new_tokens=2), progress=False)  # what fits is generated


def test_fit_history_drops_the_oldest_turns_and_keeps_the_system_prompt(small_context_model):
    loaded = load_for_inference(small_context_model)
    turns = [Message("system", "be brief")]
    for i in range(6):
        turns += [Message("user", f"question number {i} about the weather"), Message("assistant", f"answer {i}")]
    turns.append(Message("user", "last question"))
    fitted, dropped = fit_history(loaded, turns, max_new_tokens=8)
    assert dropped > 0 and fitted[0] == turns[0] and fitted[-1] == turns[-1]
    assert fitted[1:] == turns[1 + 2 * dropped:]  # whole turns, oldest first
    assert len(check_prompts(loaded, [fitted], 0)[0]) + 8 <= 96
    assert fit_history(loaded, turns[-1:], 8) == (turns[-1:], 0)  # what fits stays as it is
    with pytest.raises(PromptError, match="your message is .* over the model's context of 96 tokens"):
        fit_history(loaded, turns[:3] + [Message("user", "word " * 120)], 8, name="your message")


def test_cli_generate_refuses_empty_and_too_long_prompts(small_context_model, tmp_path):
    out = runner.invoke(app, ["generate", small_context_model, "-p", "hi", "-p", " "])
    assert out.exit_code == 2 and out.stderr.strip() == "error: --prompt 2 is empty: give some text to answer"
    out = runner.invoke(app, ["generate", small_context_model, "-p", "hi", "-p", "word " * 60, "--max-new-tokens", "16"])
    assert out.exit_code == 2 and "Traceback" not in out.output
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --prompt 2 is ") and "over the model's context of 96 tokens" in line
    assert "lower --max-new-tokens to" in line
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "short"}\n{"prompt": "%s"}\n' % ("word " * 100), encoding="utf-8")
    out = runner.invoke(app, ["generate", small_context_model, "-i", str(prompts), "-o", str(tmp_path / "o.jsonl"),
                              "--max-new-tokens", "8"])
    assert out.exit_code == 2 and f"error: {prompts} line 2 is " in out.stderr and "by itself" in out.stderr
    assert not (tmp_path / "o.jsonl").exists()  # nothing half-written
    out = runner.invoke(app, ["generate", small_context_model, "-p", "word " * 40, "--max-new-tokens", "4"])
    assert out.exit_code == 0, out.output  # lowering --max-new-tokens, as the message says, is enough
    out = runner.invoke(app, ["generate", small_context_model, "-p", "hi", "--max-new-tokens", "96"])
    assert out.exit_code == 2 and "--prompt 1: --max-new-tokens 96 alone fills the model's context of 96 tokens" in out.stderr


def test_eval_names_the_data_line_of_a_prompt_too_long(small_context_model, tmp_path):
    data = tmp_path / "gen.jsonl"
    data.write_text('{"prompt": "hi", "completion": "hello"}\n{"prompt": "%s", "completion": "x"}\n' % ("word " * 100),
                    encoding="utf-8")
    out = runner.invoke(app, ["eval", small_context_model, "--data", str(data), "-o", str(tmp_path / "ev"),
                              "--max-new-tokens", "8"])
    assert out.exit_code == 2 and f"error: {data} line 2 is " in out.stderr and "Traceback" not in out.output


def test_chat_drops_old_turns_with_a_warning_and_refuses_a_message_too_long(small_context_model):
    said = "".join(f"tell me about the weather in city number {i}\n" for i in range(5))
    out = runner.invoke(app, ["chat", small_context_model, "--max-new-tokens", "8"],
                        input="\n   \n" + said + "word " * 120 + "\nstill there?\n/exit\n")
    assert out.exit_code == 0, out.output
    assert out.output.count("bot> ") == 6  # the five questions and the last one; empty lines and the long one: none
    assert "warning: dropped the" in out.stderr and "oldest turn" in out.stderr
    assert "error: your message is " in out.stderr and "(not sent; the chat goes on)" in out.stderr
    assert "Traceback" not in out.output
