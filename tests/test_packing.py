"""Packed rows (with and without a shared prefix) compute the same loss and gradients as the
examples run one by one; the chunked cross-entropy equals the one-shot one."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from fewtune.data.render import Rendered
from fewtune.train.batching import batch_weight, collate, common_prefix_length, pack, setup_packing
from fewtune.train.loop import Trainer
from fewtune.train.loss import WeightedLMLoss
from fewtune.train.packed_attention import NAME
from tests.precision import (FP32_EPS, PRECISIONS, assert_gradients_match, assert_normwise_close,
                             capture_gradients, loss_rtol)


def _model(kind: str = "llama", **extra):
    torch.manual_seed(0)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    cfg = cls(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, **extra)
    return AutoModelForCausalLM.from_config(cfg)


def _items(prompt_weight: float = 0.0, seed: int = 1) -> list[Rendered]:
    """Four examples with a common 9-token prompt prefix, own parts of different lengths,
    loss weights starting inside the prefix when prompt_weight > 0, a fractional weight."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 300, (9,), generator=g).tolist()
    items = []
    for n in (4, 7, 1, 12):
        ids = prefix + torch.randint(0, 300, (n,), generator=g).tolist()
        weights = [prompt_weight if j < 11 else (1.0 if j % 3 else 0.5) for j in range(len(ids))]
        items.append(Rendered(ids, weights))
    return items


def _one_by_one(loss, items):
    parts = [loss(**collate([r], 0)) for r in items]
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def _grads(model, value):
    model.zero_grad()
    value.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("prompt_weight", [0.0, 0.3])
def test_packed_loss_equals_examples_one_by_one(kind, share, prompt_weight):
    model = _model(kind)
    loss = WeightedLMLoss(model)
    items = _items(prompt_weight)
    assert setup_packing(loss, share)
    assert model.config._attn_implementation == NAME
    reference, ref_weight = _one_by_one(loss, items)
    ref_grads = _grads(model, reference)
    batch = pack(items, share)
    value, weight = loss(**batch)
    assert weight.item() == pytest.approx(ref_weight.item()) == pytest.approx(batch_weight(batch).item())
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-5)
    grads = _grads(model, value)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5)


def test_packed_row_layout_has_no_padding_and_restarting_positions():
    items = _items()
    plain = pack(items, share_prefix=False)
    lengths = [len(r) for r in items]
    assert plain["input_ids"].shape == (1, sum(lengths))
    expected = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(plain["position_ids"][0], expected)
    assert common_prefix_length(items) == 9
    shared = pack(items, share_prefix=True)
    assert shared["input_ids"].shape == (1, 9 + sum(n - 9 for n in lengths))
    assert shared["position_ids"][0, :9].tolist() == list(range(9))
    assert shared["position_ids"][0, 9:13].tolist() == [9, 10, 11, 12]  # the first example continues the prefix
    # a target is the next token of the predicting position's example: the next token of the row,
    # except at the prefix's last token, which predicts the first own token of every example
    weighted = _items(0.3)
    shared = pack(weighted, share_prefix=True)
    ids = shared["input_ids"][0].tolist()
    at_prefix_end = sorted(t for row, t in zip(shared["loss_index"].tolist(), shared["targets"].tolist()) if row == 8)
    assert at_prefix_end == sorted(r.input_ids[9] for r in weighted)
    for row, target in zip(shared["loss_index"].tolist(), shared["targets"].tolist()):
        if row != 8:
            assert ids[row + 1] == target
    # targets inside the prefix appear once, carrying the weight of all four examples
    inside = [w for row, w in zip(shared["loss_index"].tolist(), shared["weights"].tolist()) if row < 8]
    assert inside and all(w == pytest.approx(4 * 0.3) for w in inside)


def test_sliding_window_is_respected_in_packed_rows():
    # a window of 4 tokens on every layer: a wrong mask would change the loss
    model = _model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0,
                   layer_types=["sliding_attention", "sliding_attention"])
    loss = WeightedLMLoss(model)
    items = _items(0.3)
    assert setup_packing(loss, True)
    reference, _ = _one_by_one(loss, items)
    for share in (False, True):
        torch.testing.assert_close(loss(**pack(items, share))[0], reference, rtol=1e-5, atol=1e-5)
    windowless = WeightedLMLoss(_model("qwen2"))
    assert not torch.allclose(_one_by_one(windowless, items)[0], reference)


def test_unsupported_attention_falls_back_to_padding():
    model = _model()
    model.config._attn_implementation = "flex_attention"
    assert not setup_packing(WeightedLMLoss(model))
    assert model.config._attn_implementation == "flex_attention"


def test_chunked_cross_entropy_equals_one_chunk():
    model = _model()
    items = _items(0.3)
    whole = WeightedLMLoss(model)
    chunked = WeightedLMLoss(model, chunk_size=3)
    assert whole.chunk > 100 and chunked.chunk == 3
    batch = collate(items, 0)
    a, b = whole(**batch), chunked(**batch)
    torch.testing.assert_close(a, b)
    ga, gb = _grads(model, a[0]), _grads(model, chunked(**batch)[0])
    # chunking reorders float32 sums: norm-wise the gradients agree within 32 eps (element by element a
    # near-zero entry can be off by 2e-5 of itself on AVX-512 kernels, which an atol of 1e-6 failed)
    for name in ga:
        assert_normwise_close(ga[name], gb[name], 32 * FP32_EPS, name)


def _losses(run_dir) -> list[float]:
    return [json.loads(l)["train_loss"] for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if "train_loss" in l]


@PRECISIONS
def test_training_with_packing_matches_padded_training(make_config, tmp_path, precision):
    """Packed rows (with and without a shared prefix) train like padded batches (tolerances: tests/precision.py)."""
    settings = dict(train__max_steps=3, method__lora__dropout=0.0, data__val_ratio=0, train__group_by_length=False,
                    train__mixed_precision=precision)
    runs = {}
    for name, extra in {"padded": {"train__packing": False}, "packed": {"train__share_prefix": False},
                        "shared": {}}.items():
        trainer = Trainer(make_config(train__output_dir=str(tmp_path / name), **settings, **extra))
        assert trainer.packing == (name != "padded") and trainer.accelerator.mixed_precision == precision
        grads = capture_gradients(trainer)
        trainer.fit()
        runs[name] = (trainer, _losses(tmp_path / name), grads)
        # the trained model leaves with its usual attention
        assert trainer.base_model.config._attn_implementation == "sdpa"
    padded = runs["padded"]
    for name in ("packed", "shared"):
        trainer, losses, grads = runs[name]
        assert len(losses) == 3
        assert_gradients_match(padded[2][0], grads[0], precision)  # the first step: the same weights
        if precision == "no":  # bf16: tests/precision.py says why later steps and weights are not compared
            assert losses == pytest.approx(padded[1], rel=1e-4)
            wa = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
            for n, p in padded[0].model.named_parameters():
                if p.requires_grad:
                    torch.testing.assert_close(wa[n], p, rtol=1e-3, atol=1e-5)
        else:
            assert losses[0] == pytest.approx(padded[1][0], rel=loss_rtol(precision))
