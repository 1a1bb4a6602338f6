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
    stop = free[4:6]
    cut = generate(loaded, [[Message("user", "x")]], gen.model_copy(update={"stop": [stop]}), progress=False)[0][0]
    assert cut == free[: free.find(stop)].strip() and stop not in cut


def test_lora_merge_equals_adapter_outputs(make_config, tmp_path):
    from transformers import AutoModelForCausalLM

    result = train(make_config(train__max_steps=3, train__lr=1e-2))
    out = runner.invoke(app, ["export", str(result.run_dir), "--merged", str(tmp_path / "merged")])
    assert out.exit_code == 0, out.output
    adapter = load_for_inference(str(result.run_dir)).model
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not hasattr(merged, "peft_config")
    ids = torch.randint(0, 2000, (2, 16))
    with torch.no_grad():
        a = adapter(input_ids=ids).logits
        b = merged(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(make_config().model.name)(input_ids=ids).logits
    assert (a - base).abs().max() > 1e-3  # the adapter changed something
    assert (a - b).abs().max() < 1e-4
    in_memory = load_for_inference(str(result.run_dir), merge=True).model  # what eval/generate use
    assert not hasattr(in_memory, "peft_config")
    with torch.no_grad():
        assert (in_memory(input_ids=ids).logits - a).abs().max() < 1e-4


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
