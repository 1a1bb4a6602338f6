"""The short LoRA training forward (fewtune.methods.fast_lora) against peft's own forward."""

from __future__ import annotations

import pytest
import torch

from fewtune.config import MethodSection
from fewtune.methods.fast_dropout import FastDropout
from fewtune.methods.fast_lora import use_fast_lora_forward
from fewtune.methods.lora import apply_lora


def _lora_model(tiny_model: str, dropout: float, fast: bool):
    from transformers import AutoModelForCausalLM

    from peft import get_peft_model

    from fewtune.methods.lora import lora_config

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    method = MethodSection(name="lora", lora={"r": 4, "alpha": 8, "dropout": dropout, "target_modules": "all-linear"})
    if fast:
        model = apply_lora(base, method)
    else:
        model = get_peft_model(base, lora_config(method))
    for name, p in model.named_parameters():  # B starts at zero: give it values so the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(hash(name) % 1000))
    return model


def _loss_and_grads(model, ids):
    model.train()
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


def test_same_loss_and_gradients_as_peft_without_dropout(tiny_model):
    ids = torch.randint(5, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    plain = _lora_model(tiny_model, 0.0, fast=False)
    fast = _lora_model(tiny_model, 0.0, fast=True)
    assert type(fast.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "fewtune.methods.fast_lora"
    loss_a, grads_a = _loss_and_grads(plain, ids)
    loss_b, grads_b = _loss_and_grads(fast, ids)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 7 * 2  # A and B, 7 layers, 2 blocks
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_eval_mode_and_no_grad_use_peft_forward(tiny_model):
    ids = torch.randint(5, 1000, (1, 16), generator=torch.Generator().manual_seed(2))
    plain = _lora_model(tiny_model, 0.1, fast=False).eval()
    fast = _lora_model(tiny_model, 0.1, fast=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_layers_reading_one_input_share_one_mask(tiny_model):
    """q, k and v read the same tensor: one dropped copy; o reads another tensor: its own mask."""
    model = _lora_model(tiny_model, 0.5, fast=True)
    attn = model.base_model.model.model.layers[0].self_attn
    seen = {}

    def spy(name):
        def hook(module, args, output):
            seen[name] = args[0]  # what lora_A multiplies: the dropped input
        return hook

    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(attn, proj).lora_A["default"].register_forward_hook(spy(proj))
    model.train()
    ids = torch.randint(5, 1000, (1, 32), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids).loss.backward()
    zeros = {k: (v == 0) for k, v in seen.items()}
    assert seen["q_proj"] is seen["k_proj"] is seen["v_proj"]
    rate = zeros["q_proj"].float().mean().item()
    assert 0.4 < rate < 0.6  # p = 0.5 (rounded to 1/65536), unscaled: the scale is applied after A
    assert not torch.equal(zeros["o_proj"], zeros["q_proj"][..., : zeros["o_proj"].shape[-1]])


def test_dropout_keeps_the_expectation(tiny_model):
    """Averaged over many masks, the adapted layer's output under dropout equals the output without it."""
    model = _lora_model(tiny_model, 0.3, fast=True)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(layer.lora_dropout["default"], FastDropout)
    x = torch.randn(1, 8, layer.in_features, generator=torch.Generator().manual_seed(4))
    layer.train()
    torch.manual_seed(5)
    mean = torch.stack([layer(x.clone()).detach() for _ in range(3000)]).mean(0)
    layer.eval()
    with torch.no_grad():
        expected = layer(x)
    base = layer.base_layer(x).detach()
    # the adapter's part of the output, averaged, matches; the base part is identical in both
    torch.testing.assert_close(mean - base, expected - base, atol=0.02 * (expected - base).abs().max().item(), rtol=0)


def test_only_plain_lora_linear_layers_change(tiny_model):
    from transformers import AutoModelForCausalLM

    from peft import get_peft_model

    from fewtune.methods.lora import lora_config

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    method = MethodSection(name="lora", lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear",
                                              "use_dora": True})
    model = get_peft_model(base, lora_config(method))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(5, 1000, (1, 12), generator=torch.Generator().manual_seed(6))
    model.train()
    before = model(input_ids=ids, labels=ids).loss
    changed = use_fast_lora_forward(model)
    assert changed == 14  # the layers change class, but DoRA (a lora_variant) keeps peft's path at run time
    after = model(input_ids=ids, labels=ids).loss
    assert torch.equal(before, after)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_autocast_bf16_close_to_peft(tiny_model, dtype):
    ids = torch.randint(5, 1000, (2, 24), generator=torch.Generator().manual_seed(7))
    plain = _lora_model(tiny_model, 0.0, fast=False)
    fast = _lora_model(tiny_model, 0.0, fast=True)
    for model in (plain, fast):
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        loss_a, grads_a = _loss_and_grads(plain, ids)
        loss_b, grads_b = _loss_and_grads(fast, ids)
    torch.testing.assert_close(loss_b.float(), loss_a.float(), rtol=2e-2, atol=2e-2)
    for name in grads_a:
        cos = torch.nn.functional.cosine_similarity(grads_a[name].flatten().float(), grads_b[name].flatten().float(), 0)
        assert cos > 0.99, name


def test_keep_multiplier_is_the_keep_mask_as_numbers():
    from fewtune.methods.fast_dropout import keep_mask, keep_multiplier

    for dtype in (torch.float32, torch.bfloat16):
        for p in (0.05, 0.5, 0.9):
            mask, prob = keep_mask((37, 101), p, generator=torch.Generator().manual_seed(11))
            mult, prob2 = keep_multiplier((37, 101), p, dtype, generator=torch.Generator().manual_seed(11))
            assert prob == prob2 and mult.dtype == dtype
            assert torch.equal(mult, mask.to(dtype))  # same random state, same mask; values exactly 0 and 1
