"""Multi-stage training: raw-text continued pretraining (data.format text), then a run started from it
(model.init_from) that merges the stage-1 adapter into its base, with the lineage recorded."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fewtune.config import build_config
from fewtune.data.dataset import render_set
from fewtune.data.formats import DataError, detect_format, load_examples, to_record
from fewtune.data.render import Template, render_conversation
from fewtune.eval.evaluate import evaluate
from fewtune.generate import load_for_inference
from fewtune.train import stages
from fewtune.train.loop import TrainingError, train

from .conftest import write_jsonl

REVIEWS = ["物流很快，包装也很好，耳机音质不错。", "质量太差了，用了两天就坏了，不推荐。", "屏幕清晰，电池耐用，性价比高。",
           "客服态度很差，退货流程太麻烦。", "The strap broke after a week; the seller never answered.",
           "Great value for the price, fast delivery and works as described."]


def test_txt_files_split_on_blank_lines_or_else_per_line(tmp_path):
    blocks = tmp_path / "blocks.txt"
    blocks.write_text("\nfirst document,\nits second line\n\n\nsecond document\n\n", encoding="utf-8")
    docs = load_examples(blocks)
    assert [(e.line, e.messages[0].content) for e in docs] == [(2, "first document,\nits second line"),
                                                              (6, "second document")]
    assert all(e.is_text and e.reference is None and e.label is None for e in docs)
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(REVIEWS) + "\n", encoding="utf-8")
    assert [e.messages[0].content for e in load_examples(lines)] == REVIEWS


def test_text_records_are_detected_only_without_a_label_and_round_trip(tmp_path):
    assert detect_format({"text": "a review"}) == "text"
    assert detect_format({"text": "a review", "id": 3}) == "text"
    assert detect_format({"text": "a review", "label": "Positive"}) == "classification"
    assert detect_format({"text": "a review", "lbl": "Positive"}) is None  # a misspelt label is reported, not trained on
    assert load_examples(write_jsonl(tmp_path / "forced.jsonl", [{"text": "doc", "lang": "zh"}]), "text")[0].is_text
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in REVIEWS])
    docs = load_examples(path)
    assert [to_record(e, "text") for e in docs] == [{"text": t} for t in REVIEWS]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    with pytest.raises(DataError, match="mixed formats"):  # a classification file with a label missing
        load_examples(mixed)
    with pytest.raises(DataError, match="is empty"):
        load_examples(write_jsonl(tmp_path / "empty.jsonl", [{"text": "  "}]))
    chat = load_examples(write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "p", "completion": "c"}]))[0]
    with pytest.raises(DataError, match="raw documents"):
        to_record(chat, "text")


def test_a_document_trains_on_every_token_and_long_ones_are_cut_into_pieces_not_lost(tokenizer):
    template = Template.for_tokenizer(tokenizer)  # a chat template: raw text must not go through it
    doc = load_examples_from_text(" ".join(REVIEWS * 3))
    whole = render_conversation(doc, tokenizer, template)
    ids = tokenizer(doc.messages[0].content, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert whole.input_ids == ids and all(w == 1.0 for w in whole.loss_weights)
    assert "<|im_start|>" not in tokenizer.decode(whole.input_ids)
    data = build_config({"data": {"max_length": 32}}).data
    pieces = render_set([doc], tokenizer, template, data, "training")
    assert len(pieces.items) == -(-len(ids) // 32) > 2 and all(len(r) <= 32 for r in pieces.items)
    assert [t for r in pieces.items for t in r.input_ids] == ids  # nothing dropped, nothing repeated
    assert pieces.partly_truncated == 0 and not pieces.dropped and pieces.examples == [doc] * len(pieces.items)


def load_examples_from_text(text):
    from fewtune.data.formats import Example, Message, TEXT_ROLE

    return Example([Message(TEXT_ROLE, text)], "doc.txt", 1)


@pytest.fixture
def stage1(tmp_path, tiny_model):
    """Continued pretraining of the tiny model on a .txt file of reviews (a few steps)."""
    corpus = tmp_path / "reviews.txt"
    corpus.write_text("\n".join(REVIEWS * 4) + "\n", encoding="utf-8")
    cfg = build_config({"model": {"name": tiny_model}, "data": {"train": str(corpus), "val_ratio": 0.2, "max_length": 64},
                        "method": {"name": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                        "train": {"output_dir": str(tmp_path / "stage1"), "max_steps": 4, "batch_size": 4, "lr": 5e-3,
                                  "warmup_ratio": 0.0, "seed": 3, "adapt_threads": False}})
    return train(cfg).run_dir


def test_continued_pretraining_then_task_training_from_the_merged_stage(stage1, make_config, tmp_path, tiny_model):
    lineage1 = json.loads((stage1 / "lineage.json").read_text())["stages"]
    assert len(lineage1) == 1 and lineage1[0]["training"] == "continued pretraining (raw text)"
    assert lineage1[0]["examples"] == 19  # 24 reviews less the 20% held out for validation

    run2 = tmp_path / "stage2"
    train(make_config(model__init_from=str(stage1), train__output_dir=str(run2), train__max_steps=3))
    merged = stage1 / stages.MERGED
    assert json.loads((merged / stages.STAMP).read_text())["run"] == str(stage1.resolve())
    cfg2 = (run2 / "config.yaml").read_text()
    assert f"name: {merged}" in cfg2 and f"init_from: {stage1}" in cfg2
    assert json.loads((run2 / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(merged)
    lineage = json.loads((run2 / "lineage.json").read_text())["stages"]
    assert [s["run"] for s in lineage] == [str(stage1.resolve()), str(run2.resolve())]
    assert lineage[0]["next_stage_starts_from"].startswith("lora adapter merged into")
    assert lineage[1]["training"] == "supervised fine-tuning" and lineage[1]["model"] == str(merged)

    # the merged folder is the stage-1 model: base + its adapter, as peft computes it
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        stage1_logits = PeftModel.from_pretrained(base, str(stage1 / "adapter"))(input_ids=ids).logits
        merged_model = AutoModelForCausalLM.from_pretrained(merged)
        assert torch.allclose(merged_model(input_ids=ids).logits, stage1_logits, atol=1e-4)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(tiny_model)(input_ids=ids).logits,
                                  stage1_logits, atol=1e-4)  # stage 1 changed the model
        # stage 2 loads as any run: its adapter on the merged base, plain peft reads it too
        peft2 = PeftModel.from_pretrained(merged_model, str(run2 / "adapter"))(input_ids=ids).logits
        loaded = load_for_inference(str(run2), precision="no")
        assert torch.allclose(loaded.model(input_ids=ids).logits, peft2, atol=1e-4)

    # a second stage-2 run reuses the merge; a changed stage-1 adapter is merged again
    made = (merged / "model.safetensors").stat().st_mtime_ns
    train(make_config(model__init_from=str(stage1), train__output_dir=str(tmp_path / "again"), train__max_steps=1))
    assert (merged / "model.safetensors").stat().st_mtime_ns == made
    weights = stage1 / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    changed = {k: v + 0.01 for k, v in load_file(weights).items()}
    save_file(changed, weights)
    train(make_config(model__init_from=str(stage1), train__output_dir=str(tmp_path / "third"), train__max_steps=1))
    assert (merged / "model.safetensors").stat().st_mtime_ns != made


def test_stage1_perplexity_on_raw_text_files(stage1, tmp_path):
    held_out = write_jsonl(tmp_path / "held.jsonl", [{"text": t} for t in REVIEWS[:3]])
    result = evaluate(str(stage1), held_out)
    assert result.task == "perplexity" and result.metrics["unit"] == "example"
    assert result.metrics["n"] == 3 and result.metrics["perplexity"] > 1


def test_runs_that_cannot_be_started_from_are_refused(make_config, tmp_path, tiny_model, stage1):
    with pytest.raises(TrainingError, match="does not exist"):
        train(make_config(model__init_from=str(tmp_path / "nowhere")))
    with pytest.raises(TrainingError, match="was trained on"):
        train(make_config(model__init_from=str(stage1), model__name="smollm2-135m-instruct"))
    prompt_run = tmp_path / "prompt"
    train(make_config(method__name="prompt_tuning", train__output_dir=str(prompt_run), train__max_steps=1))
    with pytest.raises(TrainingError, match="virtual tokens"):
        train(make_config(model__init_from=str(prompt_run), train__output_dir=str(tmp_path / "x")))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((stage1 / "config.yaml").read_text())
    for name in ("template.json", "fewtune.json"):
        (unfinished / name).write_text((stage1 / name).read_text())
    import shutil

    shutil.copytree(stage1 / "tokenizer", unfinished / "tokenizer")
    with pytest.raises(TrainingError, match="did not finish"):
        train(make_config(model__init_from=str(unfinished), train__output_dir=str(tmp_path / "y")))
