"""FastDropout: the same distribution as nn.Dropout from fewer random numbers, wired into LoRA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fewtune.methods.fast_dropout import FastDropout, fast_dropout, keep_mask
from fewtune.train.loop import Trainer


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_rate_and_expectation_match_the_requested_p(p):
    torch.manual_seed(0)
    n = 400_000
    x = torch.ones(n)
    y = fast_dropout(x, p)
    dropped = (y == 0).float().mean().item()
    # binomial standard deviation of the dropped fraction is sqrt(p(1-p)/n) < 0.0008
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, kept[0].item()))
    assert kept[0].item() == pytest.approx(1 / (1 - p), rel=1e-4)
    assert y.mean().item() == pytest.approx(1.0, abs=5 * math.sqrt(p / (1 - p) / n))


def test_every_lane_of_the_random_words_is_uniform():
    """Each 64-bit word feeds four elements: none of the four positions may be biased."""
    torch.manual_seed(1)
    keep, _ = keep_mask((200_000, 4), 0.5)
    per_lane = (~keep).float().mean(dim=0)
    assert torch.all((per_lane - 0.5).abs() < 0.01), per_lane


def test_neighbouring_elements_are_independent():
    torch.manual_seed(2)
    keep, _ = keep_mask((500_000,), 0.3)
    drop = (~keep).float()
    both = (drop[:-1] * drop[1:]).mean().item()
    assert both == pytest.approx(0.09, abs=0.003)  # P(drop)^2, not P(drop)


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(3)
    x = torch.randn(64, 32, requires_grad=True)
    y = fast_dropout(x, 0.2)
    y.backward(torch.ones_like(y))
    kept = y != 0
    assert 0 < kept.float().mean() < 1
    scale = (y[kept] / x[kept]).mean().item()
    assert torch.allclose(x.grad, kept.float() * scale)
    assert scale == pytest.approx(1 / 0.8, rel=1e-4)


def test_seeded_masks_repeat_and_eval_mode_is_identity():
    x = torch.randn(16, 16)
    torch.manual_seed(5)
    a = fast_dropout(x, 0.3)
    torch.manual_seed(5)
    b = fast_dropout(x, 0.3)
    assert torch.equal(a, b)
    module = FastDropout(0.3).eval()
    assert torch.equal(module(x), x)
    assert torch.equal(fast_dropout(x, 0.0), x)


def test_lora_training_uses_fast_dropout(make_config):
    trainer = Trainer(make_config(method__lora__dropout=0.1))
    dropouts = [m for m in trainer.model.modules() if isinstance(m, nn.Dropout) and m.p == 0.1]
    assert dropouts and all(isinstance(m, FastDropout) for m in dropouts)
    # with dropout 0 peft uses Identity and nothing is swapped
    trainer0 = Trainer(make_config(method__lora__dropout=0.0))
    assert not any(isinstance(m, FastDropout) for m in trainer0.model.modules())
    # the swapped modules really drop: two training-mode forwards of the same batch differ
    model = trainer.model.train()
    with torch.no_grad():  # LoRA's B starts at zero, which would hide any dropout on A's input
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    ids = torch.randint(0, 1000, (2, 12))
    out1 = model(input_ids=ids).logits
    out2 = model(input_ids=ids).logits
    assert not torch.allclose(out1, out2)
    model.eval()
    assert torch.allclose(model(input_ids=ids).logits, model(input_ids=ids).logits)
