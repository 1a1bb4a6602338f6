"""Vision-language SFT on a tiny randomly initialised Qwen2-VL: image data, render, train, reload, generate, merge."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch

from fewtune.config import build_config
from fewtune.data.formats import DataError, Message, convert_record, load_examples
from fewtune.data.render import Template, render_conversation
from fewtune.models import DEFAULT_MODEL, load_tokenizer
from fewtune.train.batching import collate
from fewtune.vision import load_vision
from tests.conftest import write_jsonl
from tests.tiny_vl import build_tiny_idefics3, build_tiny_qwen2_vl, picture

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


FAMILIES = {"qwen2_vl": build_tiny_qwen2_vl, "idefics3": build_tiny_idefics3}
# per family: the projector's and the top vision block's names (model.vision.train_projector / train_vision_blocks)
TRAINED_PARTS = {"qwen2_vl": (".merger.", ".blocks.1.", ".blocks.0."),
                 "idefics3": (".connector.", ".layers.1.", ".layers.0.")}


@pytest.fixture(scope="session")
def vl_models(tmp_path_factory) -> dict[str, str]:
    """Tiny random models of both families, each with its own copy of SmolLM2's tokenizer."""
    return {name: str(build(tmp_path_factory.mktemp(f"tiny-{name}"), load_tokenizer(DEFAULT_MODEL)))
            for name, build in FAMILIES.items()}


@pytest.fixture(scope="session")
def tiny_vl(vl_models) -> str:
    return vl_models["qwen2_vl"]


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory) -> Path:
    """24 pictures of a coloured bar (three colours, four widths) and the question what colour it is."""
    root = tmp_path_factory.mktemp("colours")
    rows = []
    for i in range(24):
        name = list(COLOURS)[i % 3]
        picture(root / f"img{i}.png", (64 + 8 * (i % 4), 48), COLOURS[name])
        rows.append({"messages": [{"role": "user", "content": "<image>What colour is the bar?"},
                                  {"role": "assistant", "content": name}], "images": [f"img{i}.png"]})
    return write_jsonl(root / "train.jsonl", rows)


def vl_config(model: str, data: Path, out: Path, *overrides: str):
    base = {"model": {"name": model}, "data": {"train": str(data), "val_ratio": 0.25, "max_length": 128},
            "method": {"name": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
            "train": {"output_dir": str(out), "epochs": 2, "batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.0,
                      "seed": 3, "adapt_threads": False, "mixed_precision": "no"}}
    return build_config(base, list(overrides))


# ---------------------------------------------------------------- data


def test_reads_llamafactory_multimodal_demo():
    from fewtune.datasets.common import find_shared_data

    try:
        folder = find_shared_data() / "llamafactory-demo"
    except Exception:
        pytest.skip("../shared/data is not here")
    direct = load_examples(folder / "mllm_demo.json")
    mapped = load_examples(folder / "dataset_info.json", dataset="mllm_demo")
    assert len(direct) == len(mapped) == 6
    first = direct[0]
    # two turns, each showing the picture once: each message holds the image its placeholder stands for
    assert [len(m.images) for m in first.messages] == [1, 0, 1, 0]
    assert first.images == [str((folder / "mllm_demo_data" / "1.jpg").resolve())] * 2
    assert [e.images for e in mapped] == [e.images for e in direct]
    again = convert_record(first.to_dict(), "messages", str(folder / "x.jsonl"), 1)
    assert again.messages == first.messages


def test_openai_image_parts_and_their_errors(tmp_path):
    picture(tmp_path / "a.png")
    uri = "data:image/png;base64," + base64.b64encode((tmp_path / "a.png").read_bytes()).decode()
    record = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image_url", "image_url": {"url": "a.png"}},
                                     {"type": "text", "text": " with "}, {"type": "image_url", "image_url": {"url": uri}}]},
        {"role": "assistant", "content": "the same"}]}
    example = convert_record(record, "messages", str(tmp_path / "d.jsonl"), 3)
    assert example.messages[0].content == "Compare <image> with <image>"
    assert example.images == [str(tmp_path / "a.png"), uri]

    remote = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]},
                           {"role": "assistant", "content": "no"}]}
    with pytest.raises(DataError, match="local files only") as err:
        convert_record(remote, "messages", "d.jsonl", 4)
    assert err.value.line == 4 and err.value.field == "messages[0].content[0]"
    counted = {"messages": [{"role": "user", "content": "<image> and <image>?"}, {"role": "assistant", "content": "x"}],
               "images": ["a.png"]}
    with pytest.raises(DataError, match="1 image but 2 <image> placeholders"):
        convert_record(counted, "messages", str(tmp_path / "d.jsonl"), 5)
    audio = {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
                          {"role": "assistant", "content": "x"}]}
    with pytest.raises(DataError, match="text and image parts"):
        convert_record(audio, "messages", "d.jsonl", 6)


# ---------------------------------------------------------------- render


def test_render_expands_each_image_and_trains_only_assistant_text(tiny_vl, tmp_path):
    tokenizer = load_tokenizer(tiny_vl)
    vision = load_vision(tiny_vl)
    template = Template.for_tokenizer(tokenizer)
    a, b = picture(tmp_path / "a.png", (64, 48)), picture(tmp_path / "b.png", (200, 120))
    conversation = [Message("user", "<image>Who?", images=(str(a),)), Message("assistant", "Kane."),
                    Message("user", "And <image>?", images=(str(b),)), Message("assistant", "Gretzka.")]
    r = render_conversation(conversation, tokenizer, template, vision=vision)
    pad = vision.image_token_id
    grids = vision.pixel_inputs([str(a), str(b)])["image_grid_thw"]
    expected = [int(g.prod()) // 4 for g in grids]
    assert expected[0] < expected[1]  # the larger picture costs more tokens, as the processor says
    runs, n = [], 0
    for t in r.input_ids + [None]:
        if t == pad:
            n += 1
        elif n:
            runs, n = runs + [n], 0
    assert runs == expected and r.images == (str(a), str(b))
    # the ids are what Qwen2-VL's processor gives: the template's text with each image token repeated
    text = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")}
         for m in conversation], tokenize=False)
    for n_tokens in expected:
        text = text.replace("<|vision_start|><|image_pad|><|vision_end|>",
                            "<|vision_start|>" + "<|IMG|>" * n_tokens + "<|vision_end|>", 1)
    assert r.input_ids == tokenizer(text.replace("<|IMG|>", "<|image_pad|>"), add_special_tokens=False)["input_ids"]
    # loss only on the assistant turns' text (and their end-of-turn token), never on an image
    trained = tokenizer.decode([t for t, w in zip(r.input_ids, r.loss_weights) if w > 0])
    assert trained == "Kane.<|im_end|>\nGretzka.<|im_end|>\n"
    assert all(w == 0 for t, w in zip(r.input_ids, r.loss_weights) if t == pad)
    # the generation prompt is a prefix of the training ids, with the same images
    prompt = render_conversation(conversation[:3], tokenizer, template, for_generation=True, vision=vision)
    assert r.input_ids[:len(prompt.input_ids)] == prompt.input_ids and prompt.images == r.images
    # a cut never splits an image: it moves to the image's start and the image is left out
    second = r.input_ids.index(pad, r.input_ids.index(pad) + expected[0])
    cut = render_conversation(conversation, tokenizer, template, max_length=second + 2, vision=vision)
    assert len(cut.input_ids) == second and cut.images == (str(a),) and cut.truncated


def test_idefics3_render_is_what_its_processor_gives(vl_models, tmp_path):
    from PIL import Image
    from transformers import Idefics3Processor

    model = vl_models["idefics3"]
    tokenizer, vision = load_tokenizer(model), load_vision(model)
    a, b = picture(tmp_path / "a.png", (200, 120)), picture(tmp_path / "b.png", (40, 40))
    conversation = [Message("user", "<image>Who?", images=(str(a),)), Message("assistant", "Kane."),
                    Message("user", "And <image>?", images=(str(b),)), Message("assistant", "Gretzka.")]
    r = render_conversation(conversation, tokenizer, Template.for_tokenizer(tokenizer), vision=vision)
    processor = Idefics3Processor(image_processor=vision.image_processor, tokenizer=load_tokenizer(model),
                                  image_seq_len=vision.image_seq_len)
    text = tokenizer.apply_chat_template(
        [{"role": m.role, "content": [{"type": "image"}, {"type": "text", "text": m.content.replace("<image>", "")}]
          if m.images else m.content} for m in conversation], tokenize=False)
    text = text.replace("<image>And ", "And <image>")  # the second placeholder stands after "And "
    out = processor(text=[text], images=[[Image.open(a).convert("RGB"), Image.open(b).convert("RGB")]],
                    return_tensors="pt")
    assert r.input_ids == out["input_ids"][0].tolist()  # the tiles, their markers and the global view
    batch = collate([r], tokenizer.pad_token_id)
    assert torch.equal(batch["pixel_values"], out["pixel_values"])
    assert torch.equal(batch["pixel_attention_mask"], out["pixel_attention_mask"])
    trained = tokenizer.decode([t for t, w in zip(r.input_ids, r.loss_weights) if w > 0])
    assert trained == "Kane.<|im_end|>\nGretzka.<|im_end|>\n"


def test_text_only_model_refuses_images(tiny_models, colour_data, tmp_path):
    from fewtune.train.loop import TrainingError, Trainer

    with pytest.raises(TrainingError, match="text-only model"):
        Trainer(vl_config(tiny_models["llama"], colour_data, tmp_path / "run"))


def test_image_augmentation_is_per_epoch_and_training_only(tiny_vl, colour_data):
    from fewtune.config import ImageAugmentSection

    vision = load_vision(tiny_vl)
    ref = str(colour_data.parent / "img0.png")
    train = vision.for_training(ImageAugmentSection(prob=1.0), seed=1)
    plain = vision.pixel_inputs([ref])["pixel_values"]
    first = train.pixel_inputs([ref], keys=[0])
    assert torch.equal(vision.pixel_inputs([ref])["pixel_values"], plain)  # validation/inference: never changed
    assert not torch.equal(first["pixel_values"], plain)
    assert torch.equal(first["image_grid_thw"], vision.pixel_inputs([ref])["image_grid_thw"])  # same token count
    assert torch.equal(train.pixel_inputs([ref], keys=[0])["pixel_values"], first["pixel_values"])  # reproducible
    train.epoch = 1
    assert not torch.equal(train.pixel_inputs([ref], keys=[0])["pixel_values"], first["pixel_values"])


# ---------------------------------------------------------------- training and inference


def _image_batch(run_or_model: str, data: Path):
    """A padded batch of the first four examples as training renders them, for the model at ``run_or_model``."""
    from fewtune.generate import load_for_inference

    loaded = load_for_inference(run_or_model, precision="no")
    items = [render_conversation(e, loaded.tokenizer, loaded.template, vision=loaded.vision)
             for e in load_examples(data)[:4]]
    return loaded, collate(items, loaded.tokenizer.pad_token_id)


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "loss_weights"}).logits


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained_vl(request, vl_models, colour_data, tmp_path_factory):
    """A LoRA run on a tiny model of each family with its trainer (the model as training left it)."""
    from fewtune.models import load_model
    from fewtune.train.loop import Trainer

    model = vl_models[request.param]
    base = {n: p.detach().clone() for n, p in load_model(model).named_parameters()}
    trainer = Trainer(vl_config(model, colour_data, tmp_path_factory.mktemp("vl") / "run"))
    result = trainer.fit()
    return trainer, result, base


def test_lora_trains_the_language_model_only_and_reloads(trained_vl, colour_data):
    trainer, result, base = trained_vl
    model = trainer.model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    language = (".language_model.", ".text_model.")
    assert trained and all("lora_" in n and any(part in n for part in language) for n in trained)
    frozen = [name for name in base if not any(part in name for part in language) and "lm_head" not in name]
    state = dict(model.get_base_model().named_parameters())
    assert frozen and all(torch.equal(state[name].detach(), base[name]) for name in frozen)  # vision tower untouched
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[-1] < losses[0]
    assert (result.run_dir / "tokenizer" / "preprocessor_config.json").is_file()

    loaded, batch = _image_batch(str(result.run_dir), colour_data)
    assert batch["pixel_values"].shape[0] >= 4
    model.eval()
    assert torch.allclose(_logits(loaded.model, batch), _logits(model, batch), atol=1e-5)

    from fewtune.config import GenerateSection
    from fewtune.generate import check_prompts, generate_ids

    examples = load_examples(colour_data)[:3]
    prompts = check_prompts(loaded, [e.prompt_messages for e in examples], 4)
    assert all(len(p.images) == 1 for p in prompts)
    out = generate_ids(loaded, prompts, GenerateSection(max_new_tokens=4, batch_size=2))
    # greedy generation continues exactly as the model's own forward pass says
    ids = torch.tensor([prompts[0]])
    pixels = loaded.vision.batch_inputs(ids, list(prompts[0].images), [1])
    with torch.no_grad():
        first = loaded.model(input_ids=ids, **pixels).logits[0, -1].argmax().item()
    got: list[int] = []
    generate_ids(loaded, prompts[:1], GenerateSection(max_new_tokens=1), on_step=lambda outs, tokens: got.extend(tokens))
    assert out[0][0].tokens >= 1 and got == [first]


def test_merged_export_equals_the_adapter(trained_vl, colour_data, tmp_path):
    from fewtune.export import export_merged

    _, result, _ = trained_vl
    merged = export_merged(result.run_dir, tmp_path / "merged")
    assert (merged / "preprocessor_config.json").is_file()
    adapter, batch = _image_batch(str(result.run_dir), colour_data)
    plain, batch2 = _image_batch(str(merged), colour_data)
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    assert torch.allclose(_logits(plain.model, batch), _logits(adapter.model, batch), atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_projector_and_top_vision_blocks_train_when_asked(family, vl_models, colour_data, tmp_path):
    from safetensors import safe_open

    from fewtune.models import load_model
    from fewtune.train.loop import Trainer

    projector, top, below = TRAINED_PARTS[family]
    base = {n: p.detach().clone() for n, p in load_model(vl_models[family]).named_parameters()}
    trainer = Trainer(vl_config(vl_models[family], colour_data, tmp_path / "run", "model.vision.train_projector=true",
                                "model.vision.train_vision_blocks=1", "train.epochs=1"))
    result = trainer.fit()
    changed = {n for n, p in trainer.model.named_parameters()
               if p.requires_grad and "lora_" not in n}
    assert any(projector in n for n in changed) and any(top in n for n in changed)
    assert not any(below in n for n in changed)  # only the top block
    state = dict(trainer.model.named_parameters())
    moved = [n for n in changed if projector in n and not torch.equal(state[n].detach(), base[
        n.replace("base_model.model.", "").replace(".modules_to_save.default", "")])]
    assert moved, "the projector did not change"
    with safe_open(str(result.run_dir / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(projector in k for k in keys) and any(top in k for k in keys)
    loaded, batch = _image_batch(str(result.run_dir), colour_data)
    trainer.model.eval()
    assert torch.allclose(_logits(loaded.model, batch), _logits(trainer.model, batch), atol=1e-5)


def test_data_check_finds_planted_image_faults(tiny_vl, tmp_path):
    from fewtune.quality.check import check_data

    picture(tmp_path / "ok.png", (64, 48))
    picture(tmp_path / "big.png", (400, 300))
    (tmp_path / "copy.png").write_bytes((tmp_path / "ok.png").read_bytes())
    (tmp_path / "broken.png").write_bytes(b"not a picture at all")
    picture(tmp_path / "tiny.png", (20, 12))
    picture(tmp_path / "strip.png", (2000, 8))

    def row(images, text="<image>What is it?", answer="a bar"):
        return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": answer}],
                "images": images}

    data = write_jsonl(tmp_path / "train.jsonl", [
        row(["ok.png"]),                                     # 1 fine
        row(["gone.png"]),                                   # 2 missing file
        row(["broken.png"]),                                 # 3 unreadable
        row(["ok.png", "ok.png"]),                           # 4 two images, one placeholder
        row(["copy.png"], "<image>What is this?"),           # 5 the same picture as ok.png under another name
        row(["tiny.png"]),                                   # 6 too small to see
        row(["strip.png"]),                                  # 7 too elongated for the processor
        row(["big.png"], "<image>Describe it.", "word " * 40),  # 8 its image tokens push the answer past max_length
    ])
    cfg = build_config({"model": {"name": tiny_vl}, "data": {"max_length": 40}})
    report = check_data(data, cfg=cfg, progress=False)
    found = {(p.line, p.check, p.severity) for p in report.problems}
    assert (2, "images", "error") in found and (3, "images", "error") in found
    assert (4, "schema", "error") in found
    assert (5, "images", "warning") in found and (6, "images", "warning") in found
    assert (7, "images", "error") in found
    assert (8, "length", "warning") in found  # image tokens + the question: the answer is cut
    assert not any(p.line == 1 for p in report.problems)
    messages = {p.line: p.message for p in report.problems if p.check in ("images", "schema")}
    assert "not found" in messages[2] and "not a readable image" in messages[3]
    assert "2 images but 1 <image> placeholder" in messages[4] and "same picture as" in messages[5]
    images = report.stats["train"]["images"]
    biggest = load_vision(tiny_vl).image_tokens(str(tmp_path / "big.png"))
    assert images["unreadable"] == 2 and images["tokens_per_image"]["max"] == biggest > 4


def test_choice_scoring_with_images_scores_what_training_renders(trained_vl, colour_data):
    from fewtune.eval.scoring import image_choice_scores

    trainer, result, _ = trained_vl
    loaded, _ = _image_batch(str(result.run_dir), colour_data)
    example = load_examples(colour_data)[0]
    conversation = example.prompt_messages
    (score,) = image_choice_scores(loaded.model, loaded.tokenizer, loaded.template, loaded.vision, [conversation],
                                   list(COLOURS), progress=False)
    prompt = render_conversation(conversation, loaded.tokenizer, loaded.template, for_generation=True,
                                 vision=loaded.vision)
    for label, logprob, n in zip(COLOURS, score.logprobs, score.n_tokens):
        full = render_conversation(conversation + [Message("assistant", label)], loaded.tokenizer, loaded.template,
                                   vision=loaded.vision)
        ids = torch.tensor([full.input_ids])
        pixels = loaded.vision.batch_inputs(ids, list(full.images), [len(full.images)])
        with torch.no_grad():
            logits = loaded.model(input_ids=ids, **pixels).logits[0]
        start = len(prompt.input_ids)
        expected = sum(torch.log_softmax(logits[p - 1].float(), -1)[full.input_ids[p]].item()
                       for p in range(start, start + n))
        assert loaded.tokenizer.decode(full.input_ids[start:start + n]) == f"{label}<|im_end|>"
        assert logprob == pytest.approx(expected, abs=1e-4)


def test_generate_and_eval_commands_take_images(trained_vl, colour_data, tmp_path):
    from typer.testing import CliRunner

    from fewtune.cli import app

    _, result, _ = trained_vl
    runner = CliRunner()
    image = str(colour_data.parent / "img0.png")
    out = runner.invoke(app, ["generate", str(result.run_dir), "--prompt", "What colour is the bar?", "--image", image,
                              "--max-new-tokens", "2"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["generate", str(result.run_dir), "--prompt", "What?", "--image", str(tmp_path / "no.png")])
    assert out.exit_code == 2 and "image file not found" in out.output
    out = runner.invoke(app, ["generate", str(result.run_dir), "--input", str(colour_data), "--image", image])
    assert out.exit_code == 2 and "--image goes with --prompt" in out.output  # not ignored without a word
    labelled = write_jsonl(tmp_path / "test.jsonl", [
        {**row, "label": row["messages"][1]["content"],
         "images": [str(colour_data.parent / row["images"][0])]}
        for row in map(json.loads, colour_data.read_text().splitlines()[:6])])
    out = runner.invoke(app, ["eval", str(result.run_dir), "--data", str(labelled), "--output", str(tmp_path / "ev")])
    assert out.exit_code == 0, out.output
    metrics = json.loads((tmp_path / "ev" / "results.json").read_text())["metrics"]
    assert metrics["mode"] == "choice" and 0 <= metrics["accuracy"] <= 1
    predictions = (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 6 and all(set(json.loads(p)["logprobs"]) == set(COLOURS) for p in predictions)


def test_converting_keeps_images_or_refuses(tmp_path):
    from fewtune.data.formats import to_record

    picture(tmp_path / "a.png")
    example = convert_record({"messages": [{"role": "user", "content": "<image>Which?"},
                                           {"role": "assistant", "content": "red"}], "images": ["a.png"]},
                             "messages", str(tmp_path / "d.jsonl"), 1)
    sharegpt = to_record(example, "sharegpt")
    assert sharegpt["images"] == [str(tmp_path / "a.png")]
    assert convert_record(sharegpt, "sharegpt", str(tmp_path / "other" / "d.jsonl"), 1).messages == example.messages
    with pytest.raises(DataError, match="cannot hold"):  # alpaca would drop the picture without a word
        to_record(example, "alpaca")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_training_with_frozen_vision_weights_in_bf16(family, vl_models, colour_data, tmp_path):
    """What `auto` may pick on a CPU with AVX-512 BF16 / AMX: frozen weights (the vision tower too) stored in
    bf16, images still entering the model as float32 pixels."""
    import math

    from fewtune.train.loop import Trainer

    trainer = Trainer(vl_config(vl_models[family], colour_data, tmp_path / "run", "train.mixed_precision=bf16",
                                "train.max_steps=2", "model.vision.train_projector=true"))
    result = trainer.fit()
    params = [p for n, p in trainer.model.named_parameters() if "visual" in n or "vision_model" in n or "connector" in n]
    assert any(p.requires_grad for p in params)  # the projector trains, in float32 as trained weights do
    assert all(p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16) for p in params)
    losses = [json.loads(line).get("train_loss") for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x for x in losses if x is not None] and all(math.isfinite(x) for x in losses if x is not None)
    loaded, batch = _image_batch(str(result.run_dir), colour_data)
    assert torch.isfinite(_logits(loaded.model, batch)).all()


def test_split_files_still_find_their_pictures(colour_data, tmp_path):
    from fewtune.data.tools import split_file

    split_file(colour_data, tmp_path / "splits", val_ratio=0.25, seed=0)
    written = load_examples(tmp_path / "splits" / "train.jsonl")
    assert written and all(Path(ref).is_file() for e in written for ref in e.images)
    assert {ref for e in written for ref in e.images} <= {ref for e in load_examples(colour_data) for ref in e.images}


def test_training_batches_get_fresh_image_augmentations_each_epoch(tiny_vl, colour_data, tmp_path):
    from fewtune.train.loop import Trainer

    trainer = Trainer(vl_config(tiny_vl, colour_data, tmp_path / "run", "data.augment.images.prob=1.0"))
    trainer._use_epoch_items(0)
    first = trainer.make_batch(trainer.items[:2])
    again = trainer.make_batch(trainer.items[:2])
    trainer._use_epoch_items(1)
    second = trainer.make_batch(trainer.items[:2])
    assert torch.equal(first["pixel_values"], again["pixel_values"])  # one epoch: the same draw (resumable)
    assert not torch.equal(first["pixel_values"], second["pixel_values"])  # the next epoch: a fresh one
    assert torch.equal(first["image_grid_thw"], second["image_grid_thw"])  # same sizes, same image tokens
    plain = load_vision(tiny_vl).pixel_inputs([ref for r in trainer.val_set.items[:2] for ref in r.images])
    assert torch.equal(trainer.make_batch(trainer.val_set.items[:2])["pixel_values"], plain["pixel_values"])


def test_max_pixels_bounds_the_image_tokens(tiny_vl, tmp_path):
    from fewtune.config import VisionSection
    from fewtune.data.images import ImageError
    from fewtune.vision import vision_for

    default, bounded = load_vision(tiny_vl), vision_for(tiny_vl, settings=VisionSection(max_pixels=28 * 28 * 4))
    big = str(picture(tmp_path / "big.png", (400, 300)))
    # Qwen2-VL's rule: the largest 28-pixel grid within the area, aspect kept (84x112 -> 12, then 28x56 -> 2)
    assert default.image_tokens(big) == 12 and bounded.image_tokens(big) == 2
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageError, match="not a readable image"):
        bounded.image_tokens(str(tmp_path / "text.png"))


def test_resume_notices_a_picture_edited_since_the_checkpoint(tiny_vl, tmp_path):
    """A picture's token ids depend only on its size: the resume check hashes the pictures' bytes as well, so a
    picture repainted between sessions (same size, same file name) is a changed input, not a silent mix."""
    from fewtune.train.loop import Interrupted, Trainer, TrainingError

    rows = []
    for i in range(8):
        name = list(COLOURS)[i % 3]
        picture(tmp_path / f"img{i}.png", (64, 48), COLOURS[name])
        rows.append({"messages": [{"role": "user", "content": "<image>What colour is the bar?"},
                                  {"role": "assistant", "content": name}], "images": [f"img{i}.png"]})
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = vl_config(tiny_vl, data, tmp_path / "run", "train.save_every=1", "data.val_ratio=0.0")
    with pytest.raises(Interrupted):
        Trainer(cfg).fit(stop_after=1)
    picture(tmp_path / "img0.png", (64, 48), COLOURS["blue"])  # red repainted blue, same size
    with pytest.raises(TrainingError, match="a picture changed"):
        Trainer(cfg).fit(resume=True)
    picture(tmp_path / "img0.png", (64, 48), COLOURS["red"])  # the same bytes again: the resume goes on
    assert Trainer(cfg).fit(resume=True).steps > 1
