"""`fewtune export --gguf`: the merged model, tokenizer and training template as one GGUF file, read back by
transformers' GGUF loader."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from fewtune.cli import app
from fewtune.data.formats import Message
from fewtune.data.render import Template, render_conversation
from fewtune.generate import load_for_inference
from fewtune.gguf_export import GGUFExportError, write_gguf
from fewtune.train.loop import train

runner = CliRunner()
TEXTS = ["打开车窗和空调", "The price is 12345 dollars!", "<|im_start|>user\nhi<|im_end|>", "  spaces\tand\nlines"]


def _ids(tokenizer, text):
    return torch.tensor([tokenizer(text).input_ids])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_round_trip_is_exact_and_q8_keeps_the_argmax(tiny_models, arch, tmp_path):
    loaded = load_for_inference(tiny_models[arch], precision="no", system_prompt="You are a car assistant.")
    model, tok = loaded.model, loaded.tokenizer
    for quant in ("f32", "q8_0"):
        report = write_gguf(model, tok, loaded.template, tmp_path / f"m-{quant}.gguf", quant)
        back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f"m-{quant}.gguf").eval()
        ids = _ids(tok, " ".join(TEXTS))
        with torch.no_grad():
            a, b = model(ids).logits, back(ids).logits
        if quant == "f32":  # llama's rotary re-layout and back, tied embeddings, qwen2's biases: all exact
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        else:
            assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
            assert (a - b).abs().max() < 0.1
            assert report.bytes < 0.45 * (tmp_path / "m-f32.gguf").stat().st_size  # about a quarter of fp32
    gguf_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m-f32.gguf")
    assert [gguf_tok(t).input_ids for t in TEXTS] == [tok(t).input_ids for t in TEXTS]
    # the runtime's chat template gives the tokens training saw, its system prompt included, with no system turn
    conversation = [Message("user", "打开车窗")]
    trained = render_conversation(conversation, tok, loaded.template, for_generation=True).input_ids
    runtime = gguf_tok.apply_chat_template([{"role": "user", "content": "打开车窗"}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    assert list(runtime) == trained


def test_plain_templates_are_written_as_jinja(tokenizer, tiny_model, tmp_path):
    from fewtune.gguf_export import chat_template_for_gguf

    template = Template.for_tokenizer(tokenizer, "plain", separator="\n\n###\n\n", stop=" END", system_prompt="Be brief.")
    jinja = chat_template_for_gguf(template, tokenizer)
    from jinja2 import Template as Jinja

    text = Jinja(jinja).render(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    rendered = tokenizer.decode(render_conversation([Message("user", "q"), Message("assistant", "a")], tokenizer,
                                                    template).input_ids)
    assert text == "Be brief.\n\nq\n\n###\n\na END" and text in rendered


def test_export_gguf_command_checks_the_file_against_the_merged_run(make_config, pc_data, tmp_path):
    run = tmp_path / "run"
    train(make_config(**{"train.max_steps": 3, "train.output_dir": str(run), "data.system_prompt": "车载助手"}))
    out = tmp_path / "run.gguf"
    result = runner.invoke(app, ["export", str(run), "--gguf", str(out), "--quant", "q8_0", "--check", str(pc_data)])
    assert result.exit_code == 0, result.output
    assert "GGUF written to" in result.output and "top-token agreement" in result.output
    check = json.loads((tmp_path / "run.gguf.check.json").read_text())
    assert check["examples"] == 20 and check["same_prompt_tokens"] == 20  # template + tokenizer travel in the file
    assert check["top_token_agreement"] >= 0.9 and check["gguf_bytes"] < check["fp32_bytes"]
    assert check["fp32_tokens_per_s"] > 0
    # fewtune itself runs the file, prompting it as the run was trained
    gen = runner.invoke(app, ["generate", str(out), "--prompt", "打开车窗", "--max-new-tokens", "4"])
    assert gen.exit_code == 0, gen.output
    for args, message in [(["--gguf", str(tmp_path / "x.gguf"), "--quant", "q4_k_m"], "llama-quantize"),
                          (["--gguf", str(tmp_path / "x.bin")], "name the file *.gguf"),
                          (["--check", str(pc_data)], "give --gguf FILE.gguf with it")]:
        bad = runner.invoke(app, ["export", str(run), *args])
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)


def test_unsupported_architectures_are_named(tokenizer, tmp_path):
    from transformers import GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(GGUFExportError, match="a gpt2 model cannot be written as GGUF here: supported are llama"):
        write_gguf(model, tokenizer, Template.for_tokenizer(tokenizer), tmp_path / "g.gguf")
