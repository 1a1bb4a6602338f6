"""Every peft method: trains, saves, reloads for (batched, left-padded) generation, merges where it can."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fewtune.config import GenerateSection
from fewtune.data.formats import Message
from fewtune.export import export_merged
from fewtune.generate import generate, load_for_inference
from fewtune.methods import MethodError
from fewtune.methods.lora import check_qlora_supported
from fewtune.train.loop import Trainer, collate, train

PROMPTS = [[Message("user", "打开车窗 1")], [Message("user", "a much longer prompt than the first one, with words")]]

METHODS = {
    "dora": dict(method__lora__use_dora=True),
    "rslora": dict(method__lora__use_rslora=True),
    "ia3": dict(method__name="ia3", train__lr=1e-2),
    "prompt_tuning": dict(method__name="prompt_tuning", method__prompt__num_virtual_tokens=4, train__lr=1e-2),
    "prompt_tuning_text": dict(method__name="prompt_tuning", method__prompt__num_virtual_tokens=4,
                               method__prompt__init_text="answer with json", train__lr=1e-2),
    "p_tuning": dict(method__name="p_tuning", method__prompt__num_virtual_tokens=4,
                     method__prompt__encoder_hidden_size=32, train__lr=1e-2),
    "prefix_tuning": dict(method__name="prefix_tuning", method__prompt__num_virtual_tokens=4, train__lr=1e-2),
}
MERGEABLE = {"dora", "rslora", "ia3"}


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_saves_reloads_and_merges(name, make_config, tmp_path):
    cfg = make_config(train__max_steps=3, train__output_dir=str(tmp_path / name), **METHODS[name])
    trainer = Trainer(cfg)
    before = _trainable(trainer.model)
    assert before and trainer.trainable < trainer.total
    trainer.fit()
    after = _trainable(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before), "no trainable tensor moved"
    run = tmp_path / name
    peft_type = json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"]
    assert peft_type == {"dora": "LORA", "rslora": "LORA"}.get(name, name.replace("_text", "").upper())

    loaded = load_for_inference(str(run))
    gen = GenerateSection(max_new_tokens=5, batch_size=2)
    batched = generate(loaded, PROMPTS, gen, progress=False)
    single = [generate(loaded, [p], gen.model_copy(update={"batch_size": 1}), progress=False)[0] for p in PROMPTS]
    assert batched == single and all(len(o) == 1 for o in batched)
    in_memory = load_for_inference(str(run), merge=True)  # how eval and generate load a run
    assert hasattr(in_memory.model, "peft_config") == (name not in MERGEABLE)
    assert generate(in_memory, PROMPTS, gen, progress=False) == batched

    if name in MERGEABLE:
        out = export_merged(run, tmp_path / f"{name}-merged")
        merged = load_for_inference(str(out))
        assert generate(merged, PROMPTS, gen, progress=False) == batched
    else:
        with pytest.raises(MethodError, match="cannot be merged"):
            export_merged(run, tmp_path / f"{name}-merged")


@pytest.mark.parametrize("name", ["prefix_tuning", "prompt_tuning_text", "p_tuning"])
def test_prompt_learning_generates_what_the_forward_computes(name, make_config, tmp_path):
    """peft tells generation's first step by past_key_values, which transformers 5.x's loop leaves empty (it passes
    `cache`): prefix tuning's prefix was dropped (the run generated as its base model) and prompt/P-tuning's virtual
    tokens were put in front of every new token again. Each generated step's scores must be the training forward's
    logits on the sequence so far, which differ from the base model's."""
    from fewtune.generate import prefix_tuning_cache, prompt_ids

    run = tmp_path / name
    train(make_config(train__max_steps=3, train__output_dir=str(run), **METHODS[name]))
    loaded = load_for_inference(str(run), precision="no")
    model = loaded.model
    ids = torch.tensor([prompt_ids(loaded, PROMPTS[0])])
    with torch.no_grad():
        with prefix_tuning_cache(model):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True)
        steps = [model(input_ids=out.sequences[:, :ids.shape[1] + k]).logits[0, -1] for k in range(3)]
        with model.disable_adapter():
            base = model(input_ids=ids).logits[0, -1]
    assert (steps[0] - base).abs().max() > 1e-2  # the trained prompt does change the logits
    for k in range(3):
        assert torch.allclose(out.scores[k][0], steps[k], atol=1e-4)
    # fewtune's generate (model.generate for prompt-learning models) decodes the same first token
    first = generate(loaded, [PROMPTS[0]], GenerateSection(max_new_tokens=1), progress=False)[0][0]
    assert first == loaded.tokenizer.decode([int(steps[0].argmax())], skip_special_tokens=True).strip()


@pytest.mark.parametrize("name", ["prefix_tuning", "prompt_tuning_text", "p_tuning"])
def test_prompt_learning_runs_are_choice_scored_exactly(name, make_config, tmp_path):
    """Choice scoring (how eval scores classification) of a prompt-learning run crashed in peft's forward (the label
    pass's 4-D mask against peft's 2-D one for the virtual tokens). Each label's score must be the log-probability a
    plain forward of prompt + label gives it."""
    from fewtune.data.render import render_conversation
    from fewtune.eval.scoring import choice_scores, label_continuation

    run = tmp_path / name
    train(make_config(train__max_steps=2, train__output_dir=str(run), **METHODS[name]))
    loaded = load_for_inference(str(run), precision="no")
    model, tok, template = loaded.model, loaded.tokenizer, loaded.template
    labels = ["yes", "no", "打开车窗"]
    scores = list(choice_scores(model, tok, template, PROMPTS, labels, batch_size=2, progress=False))
    for conversation, score in zip(PROMPTS, scores):
        prompt = render_conversation(conversation, tok, template, for_generation=True).input_ids
        for j, label in enumerate(labels):
            cont = label_continuation(conversation, label, tok, template, prompt=prompt)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + cont])).logits[0].float()
            first = logits.shape[0] - len(prompt) - len(cont) + len(prompt) - 1  # after any virtual tokens
            expected = sum(F.log_softmax(logits[first + k], dim=-1)[t].item() for k, t in enumerate(cont))
            assert score.logprobs[j] == pytest.approx(expected, abs=1e-4)
            assert score.n_tokens[j] == len(cont)


def test_rslora_scales_by_square_root_of_rank(make_config):
    plain = Trainer(make_config(method__lora__r=4, method__lora__alpha=8))
    rs = Trainer(make_config(method__lora__r=4, method__lora__alpha=8, method__lora__use_rslora=True))
    layer = lambda t: next(m for m in t.model.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict))
    assert layer(plain).scaling["default"] == pytest.approx(8 / 4)
    assert layer(rs).scaling["default"] == pytest.approx(8 / 4 ** 0.5)


def test_dora_adds_magnitude_vectors(make_config):
    names = [n for n, _ in Trainer(make_config(method__lora__use_dora=True)).model.named_parameters()]
    assert any("lora_magnitude_vector" in n for n in names)


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_prompt_learning_loss_equals_hand_computation(name, make_config):
    trainer = Trainer(make_config(**METHODS[name]))
    items = trainer.train_set.items[:3]
    batch = collate(items, trainer.tokenizer.pad_token_id)
    trainer.loss_module.eval()
    with torch.no_grad():
        loss_sum, weight = trainer.loss_module(**batch)
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    virtual = 0 if name == "prefix_tuning" else 4
    assert logits.shape[1] == batch["input_ids"].shape[1] + virtual
    total, count = 0.0, 0.0
    for row, item in enumerate(items):
        for pos in range(1, len(item)):
            w = item.loss_weights[pos]
            if w > 0:  # the logit at position pos - 1 predicts token pos
                lp = F.log_softmax(logits[row, virtual + pos - 1].float(), dim=-1)
                total += -w * lp[item.input_ids[pos]].item()
                count += w
    assert weight.item() == pytest.approx(count)
    assert loss_sum.item() == pytest.approx(total, rel=1e-4)


def test_qlora_on_cpu_fails_clearly(make_config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MethodError, match="qlora needs a CUDA GPU"):
        check_qlora_supported()
    with pytest.raises(MethodError, match="qlora needs a CUDA GPU"):
        train(make_config(method__name="qlora"))


def test_unknown_method_names_the_choices(make_config):
    from fewtune.config import ConfigError

    with pytest.raises(ConfigError, match="prompt_tuning"):
        make_config(method__name="adapter")


def test_prompt_tuning_starts_from_vocabulary_embeddings(make_config):
    trainer = Trainer(make_config(**METHODS["prompt_tuning"]))
    prompt = next(p for n, p in trainer.model.named_parameters() if p.requires_grad)
    vocab = trainer.model.get_input_embeddings().weight
    # every virtual token is a row of the embedding matrix, not a N(0, 1) draw (compared in the matrix's dtype:
    # a bf16 run stores the frozen matrix in bf16 after the float32 prompt was copied from it)
    assert all(any(torch.equal(row.to(vocab.dtype), v) for v in vocab) for row in prompt.detach()[:4])
