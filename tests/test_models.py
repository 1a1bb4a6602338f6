import json

import torch

from fewtune.models import _drop_gguf_quantization, resolve_model_path


def test_converted_gguf_config_is_saveable(tmp_path):
    """A cache converted from GGUF holds float weights: a config still claiming gguf quantization
    makes save_pretrained refuse, so merged exports failed. It is dropped (and old caches repaired)."""
    config = {"model_type": "llama", "quantization_config": {"quant_method": "gguf", "gguf_file": "x.gguf"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    _drop_gguf_quantization(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "llama"}


def test_embedded_default_resolves_to_a_clean_cache():
    folder = resolve_model_path("smollm2-135m-instruct")
    config = json.loads(open(f"{folder}/config.json").read())
    assert "quantization_config" not in config and config["model_type"] == "llama"


# ---------------------------------------------------------------- hub ids without a network


import shutil  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
from huggingface_hub import constants  # noqa: E402

from fewtune.models import ModelNotFoundError, load_model, load_tokenizer  # noqa: E402
from fewtune.train.fingerprint import model_fingerprint  # noqa: E402


def _no_dns(monkeypatch) -> list[str]:
    looked_up = []

    def fail(host, *args, **kwargs):
        looked_up.append(host)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return looked_up


def test_an_unreachable_hub_fails_at_once_with_what_to_do(monkeypatch, tmp_path):
    looked_up = _no_dns(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as caught:
        load_model("no-such-org/no-such-model")
    assert time.monotonic() - start < 5  # not transformers' retries with back-off (about 25 s a file)
    message = str(caught.value)
    assert looked_up == ["huggingface.co"]
    assert "huggingface.co cannot be reached" in message and "not in the local hub cache" in message
    assert "pass a local folder" in message and "smollm2-135m-instruct" in message
    # a hub id's fingerprint does not depend on the network: a run started online resumes offline
    assert model_fingerprint("no-such-org/no-such-model") == "hub:no-such-org/no-such-model"


def test_an_unreachable_hub_loads_the_local_hub_cache(monkeypatch, tmp_path, tiny_models):
    _no_dns(monkeypatch)
    cache = tmp_path / "hub"
    snapshot = cache / "models--some-org--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_models["llama"], snapshot)
    (cache / "models--some-org--tiny" / "refs").mkdir()
    (cache / "models--some-org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model_path("some-org/tiny") == str(snapshot)
    model, tokenizer = load_model("some-org/tiny"), load_tokenizer("some-org/tiny")
    expected = load_model(tiny_models["llama"])
    assert torch.equal(model.get_input_embeddings().weight, expected.get_input_embeddings().weight)
    assert tokenizer("hello").input_ids == load_tokenizer(tiny_models["llama"])("hello").input_ids


def test_a_reachable_hub_or_offline_mode_leaves_the_id_to_transformers(monkeypatch):
    looked_up = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: looked_up.append(host) or [])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert resolve_model_path("some-org/some-model") == "some-org/some-model" and looked_up == ["huggingface.co"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # transformers reads only the cache then, without retries
    assert resolve_model_path("some-org/other-model") == "some-org/other-model" and len(looked_up) == 1
