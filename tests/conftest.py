"""Shared fixtures: tiny random models (Llama, Qwen2 families) with a real tokenizer.

The tokenizer is SmolLM2's (ChatML chat template, 49k vocabulary), taken from the
embedded default model; the weights are random and small (hidden size 64, 2 layers), so
training steps take milliseconds and the whole unit suite runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fewtune.config import build_config
from fewtune.models import DEFAULT_MODEL, load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(DEFAULT_MODEL)


def _tiny_config(arch: str, tok):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](**common)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer) -> dict[str, str]:
    from transformers import AutoModelForCausalLM

    out = {}
    for arch in ("llama", "qwen2"):
        folder = tmp_path_factory.mktemp(f"tiny-{arch}")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_tiny_config(arch, tokenizer))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[arch] = str(folder)
    return out


@pytest.fixture
def tiny_model(tiny_models) -> str:
    return tiny_models["llama"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def pc_data(tmp_path) -> Path:
    """40 short prompt/completion pairs with completions of varying length."""
    rows = [{"prompt": f"打开车窗 {i}", "completion": "{\"actions\":[\"打开车窗\"]}" + " ok" * (i % 4)} for i in range(40)]
    return write_jsonl(tmp_path / "train.jsonl", rows)


@pytest.fixture
def make_config(tmp_path, tiny_model, pc_data):
    """A small, fast training config on the tiny model; keyword overrides in dotted form."""

    def make(**dotted):
        base = {
            "model": {"name": tiny_model},
            "data": {"train": str(pc_data), "val_ratio": 0.2, "max_length": 64},
            "method": {"name": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
            # adapt_threads off: a test compares runs, and another thread count (the governor's answer to a busy
            # machine) can round bf16 products differently; the governor's own tests turn it on
            "train": {"output_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 4, "lr": 1e-3,
                      "warmup_ratio": 0.0, "seed": 3, "adapt_threads": False},
        }
        return build_config(base, [f"{k.replace('__', '.')}={v}" for k, v in dotted.items()])

    return make


@pytest.fixture(scope="session")
def _precision_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("precision-cache") / "precision.json"


@pytest.fixture(autouse=True)
def _precision_cache_in_tmp(_precision_cache, monkeypatch):
    """auto's step timings go to one cache per test session (the tiny models live there too), not the user's."""
    monkeypatch.setattr("fewtune.precision._cache_path", lambda: _precision_cache)


@pytest.fixture(autouse=True)
def _precision_pinned(monkeypatch):
    """``auto`` (training and inference) is pinned to float32 unless FEWTUNE_MIXED_PRECISION is set from outside:
    left to time itself, it would choose bf16 on some CPUs and fp32 on others, and the suite would test
    different arithmetic on each kind. `make test-precision` sets it to bf16; the tests of the choice itself
    unset it."""
    import os

    from fewtune.train import runtime

    if not os.environ.get(runtime.PRECISION_ENV):
        monkeypatch.setenv(runtime.PRECISION_ENV, "no")


@pytest.fixture(autouse=True)
def _render_cache_in_tmp(tmp_path, monkeypatch):
    """Tests keep the tokenization cache in their own temporary folder, not in the user's cache."""
    monkeypatch.setattr("fewtune.data.cache._cache_dir", lambda: tmp_path / "render-cache")


def pytest_collection_modifyitems(config, items):
    """Mark `precision` every test that trains with the precision `auto` picks (it uses make_config and does
    not pin one itself): these are the tests a bf16 machine and an fp32 machine run differently, so .ci/run
    runs them again in bf16 (FEWTUNE_MIXED_PRECISION=bf16; the suite itself pins fp32)."""
    for item in items:
        pinned = "precision" in getattr(getattr(item, "callspec", None), "params", {})
        if "make_config" in getattr(item, "fixturenames", ()) and not pinned:
            item.add_marker(pytest.mark.precision)
