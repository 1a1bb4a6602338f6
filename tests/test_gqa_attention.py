"""The CPU attention for grouped-query models with a mask: same outputs as transformers' SDPA, no key/value copies."""

import pytest
import torch
import torch.nn.functional as F

from fewtune import gqa_attention
from fewtune.generate import load_for_inference


def _spy(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape[1], k.shape[1], kwargs.get("enable_gqa", False)))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def _padded_batch(tokenizer):
    rows = [tokenizer("a short one").input_ids, tokenizer("a longer sentence with several more words").input_ids]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_inference_model_switches_and_gives_sdpas_outputs(tiny_models, arch, monkeypatch):
    loaded = load_for_inference(tiny_models[arch], precision="no")
    model = loaded.model
    assert model.config._attn_implementation == gqa_attention.NAME
    ids, mask = _padded_batch(loaded.tokenizer)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
    # the tiny models have 4 query heads and 2 key/value heads: every layer ran on the 2 heads, with enable_gqa
    assert calls and all(q == 4 and k == 2 and gqa for q, k, gqa in calls)
    model.config._attn_implementation = "sdpa"
    calls.clear()
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits
    assert calls and all(k == 4 and not gqa for q, k, gqa in calls)  # transformers repeated the key/value heads
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)


def test_training_and_unmasked_calls_go_to_transformers(tiny_model, monkeypatch):
    loaded = load_for_inference(tiny_model, precision="no")
    model = loaded.model
    ids, mask = _padded_batch(loaded.tokenizer)
    calls = _spy(monkeypatch)
    model.train()
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()  # gradients: transformers' own path
    assert calls and all(k == 4 and not gqa for q, k, gqa in calls)  # repeated keys/values: transformers' SDPA
    assert model.get_input_embeddings().weight.grad is not None
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids[1:])  # one row, no mask: transformers' own call (its causal kernel takes enable_gqa)
    assert calls == [(4, 2, True)] * model.config.num_hidden_layers


def test_models_without_grouped_heads_keep_sdpa(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    assert not gqa_attention.use_gqa_attention(model)
    assert model.config._attn_implementation == "sdpa"
    eager = AutoModelForCausalLM.from_config(LlamaConfig(**{**config.to_dict(), "num_key_value_heads": 2}),
                                             attn_implementation="eager")
    assert not gqa_attention.use_gqa_attention(eager)  # only replaces transformers' SDPA, never a user's choice
