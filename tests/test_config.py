import pytest

from fewtune.config import ConfigError, build_config, load_config


def test_defaults_follow_small_data_practice():
    cfg = build_config({})
    assert (cfg.method.name, cfg.method.lora.r, cfg.method.lora.alpha, cfg.method.lora.dropout) == ("lora", 8, 16, 0.05)
    assert cfg.train.resolved_lr("lora") == 1e-4 and cfg.train.resolved_lr("full") == 1e-5
    assert (cfg.train.epochs, cfg.train.weight_decay, cfg.train.max_grad_norm, cfg.train.warmup_ratio) == (3, 0.01, 1.0, 0.03)
    assert cfg.train.scheduler == "cosine" and cfg.train.early_stopping.enabled


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rat'.*|did you mean") as info:
        build_config({"train": {"lrr": 1}})
    assert "did you mean 'train.lr'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        build_config({"method": {"lora": {"rank": 4}}})
    assert "method.lora.rank" in str(info.value) and "method.lora.r" in str(info.value)
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        build_config({"trian": {}})


def test_wrong_type_names_the_key_path():
    with pytest.raises(ConfigError, match=r"'train.batch_size'") as info:
        build_config({"train": {"batch_size": "eight"}})
    assert "eight" in str(info.value)
    with pytest.raises(ConfigError, match=r"'method.name'"):
        build_config({"method": {"name": "lorax"}})


def test_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n")
    cfg = load_config(path, ["train.lr=2e-4", "method.lora.target_modules=[q_proj,v_proj]", "data.system_prompt=你好"])
    assert cfg.train.lr == 2e-4 and cfg.method.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.system_prompt == "你好"
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        load_config(path, ["train.epoch=2"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(path, ["train.lr"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
