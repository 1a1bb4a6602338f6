import json

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
