"""`generate --input` gives the model the prompt training renders, for a record of every data format.

The training side is the training loader (``load_examples``) and ``render_conversation`` with the
template a run saves; the generate side is the CLI reading the same records (the model's
``generate`` replaced by a recorder) and ``fewtune.generate.prompt_ids``. A record that is only
a prompt (its reply left out) must give the same ids as the whole record: a QA context, an
alpaca system and history, a sharegpt system are rendered as training renders them.
"""

import copy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fewtune.generate
from fewtune.cli import app
from fewtune.data.formats import FORMATS, load_examples
from fewtune.data.render import Template, render_conversation
from fewtune.generate import prompt_ids
from tests.conftest import write_jsonl

runner = CliRunner()

# each format's record, and how to make it only a prompt: the reply field to leave out, or (chat
# formats) the list of turns whose final assistant turn to leave out
RECORDS = {
    "prompt_completion": ({"prompt": "打开车窗", "completion": "好的，车窗已打开"}, "completion"),
    "messages": ({"messages": [{"role": "system", "content": "你是车载助手"}, {"role": "user", "content": "冷"},
                               {"role": "assistant", "content": "要开暖气吗？"}, {"role": "user", "content": "要"},
                               {"role": "assistant", "content": "暖气已打开"}]}, "messages"),
    "alpaca": ({"instruction": "翻译成中文", "input": "hello", "output": "你好", "system": "你是翻译",
                "history": [["翻译成中文: cat", "猫"]]}, "output"),
    "sharegpt": ({"conversations": [{"from": "human", "value": "天气如何？"}, {"from": "gpt", "value": "晴天"}],
                  "system": "回答要简短"}, "conversations"),
    "classification": ({"text": "这部电影太好看了", "label": "positive"}, "label"),
    "qa": ({"question": "谁发明了电话？", "answer": "贝尔", "context": "1876 年，贝尔获得了电话的专利。"}, "answer"),
}


def only_prompt(record: dict, reply: str) -> dict:
    out = copy.deepcopy(record)
    if isinstance(out[reply], list):
        assert out[reply][-1].get("role", out[reply][-1].get("from")) in ("assistant", "gpt")
        out[reply] = out[reply][:-1]
    else:
        del out[reply]
    return out


def test_every_format_has_a_record():
    # but text: raw documents train no prompt; a {"text"} input is a classification input (test_formats checks it)
    assert set(RECORDS) == set(FORMATS) - {"text"}


@pytest.mark.parametrize("kind", ["chat", "plain"])
def test_generate_input_prompts_are_the_prompts_training_renders(kind, make_config, tiny_model, tokenizer, tmp_path,
                                                                 monkeypatch):
    cfg = make_config(model__template=kind)
    # the template as training builds it (train/loop.py) and saves it; a model folder carrying a
    # template.json is generated from with it, as a run directory or a merged export is
    template = Template.for_tokenizer(tokenizer, cfg.model.template, cfg.model.separator, cfg.model.stop,
                                      cfg.data.system_prompt)
    assert template.kind == kind
    model = tmp_path / "model"
    model.mkdir()
    for part in Path(tiny_model).iterdir():
        (model / part.name).symlink_to(part)
    template.save(model / "template.json")

    training = {fmt: load_examples(write_jsonl(tmp_path / f"{fmt}.jsonl", [record]))[0]
                for fmt, (record, _) in RECORDS.items()}
    inputs = [record for record, _ in RECORDS.values()] + [only_prompt(r, reply) for r, reply in RECORDS.values()]
    seen = {}

    def recorder(loaded, conversations, gen, names=None, **kwargs):
        seen.update(loaded=loaded, conversations=conversations)
        return [["ok"] for _ in conversations]

    monkeypatch.setattr(fewtune.generate, "generate", recorder)
    out = runner.invoke(app, ["generate", str(model), "--input", str(write_jsonl(tmp_path / "in.jsonl", inputs)),
                              "-o", str(tmp_path / "out.jsonl"), "--max-new-tokens", "4"])
    assert out.exit_code == 0, out.output
    loaded = seen["loaded"]
    assert loaded.template == template
    given = [prompt_ids(loaded, c) for c in seen["conversations"]]
    assert len(given) == 2 * len(RECORDS)
    for i, (fmt, example) in enumerate(training.items()):
        rendered = render_conversation(example, loaded.tokenizer, template)
        ids, weights = rendered.input_ids, rendered.loss_weights
        for what, prompt in (("whole record", given[i]), ("prompt only", given[len(RECORDS) + i])):
            n = len(prompt)
            # the prompt is what training renders before the final reply: then only reply tokens follow
            assert ids[:n] == prompt, f"{fmt} ({what}): the generation prompt is not the training prompt"
            assert weights[n - 1] == 0 and n < len(ids) and all(w > 0 for w in weights[n:]), f"{fmt} ({what})"
    assert training["qa"].messages[0].content.startswith("1876 年")  # the context is in the prompt
    assert [m.role for m in training["alpaca"].prompt_messages] == ["system", "user", "assistant", "user"]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 * len(RECORDS) and rows[0]["reference"] == "好的，车窗已打开"
