"""The benchmarks' recipes (benchmarks/configs/*.yaml) are fewtune configs: each loads with fewtune.config,
with no unknown, misspelt or outdated key, and small_data.py's "best" recipes still name the setups the
stored results ran under."""

import importlib.util
import json
import logging
import warnings
from pathlib import Path

import pytest

from fewtune.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "benchmarks" / "configs").glob("*.yaml"))


def test_there_are_recipes():
    names = {p.name for p in CONFIGS}
    assert {"small_data_usual.yaml", "snips_eval_lora.yaml", "train_speed.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads(path, caplog):
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(path)
    # a key the config only accepts with a warning (one that has moved, say) fails here
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert cfg.method.name == "lora"


def test_every_recipe_is_read_by_a_benchmark():
    sources = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "benchmarks").glob("*.py"))
    unused = [p.name for p in CONFIGS if p.name not in sources and not p.name.startswith("small_data_best_")]
    assert unused == []  # small_data_best_<dataset>.yaml: checked below against small_data.py's data sets


def test_small_data_best_recipes_name_the_stored_best_rows():
    spec = importlib.util.spec_from_file_location("small_data", ROOT / "benchmarks" / "small_data.py")
    small_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(small_data)
    best_files = {p.stem.removeprefix("small_data_best_") for p in CONFIGS if p.stem.startswith("small_data_best_")}
    # snips10 and car50 came with the tune setup: they have no hand-found best recipe
    assert best_files == set(small_data.MODELS) - {"snips10", "car50"}
    stored = {json.loads(line)["setup"] for line in small_data.RESULTS.read_text(encoding="utf-8").splitlines()}
    assert small_data.best_candidate("eprstmt") == "suggest+regularise.label_smoothing=0.1" in stored
    assert small_data.best_candidate("tnews") == "suggest+regularise.neftune_alpha=5" in stored
    assert small_data.BEST["snips"] == {"train.batch_size": 8, "train.lr": 5e-4, "train.epochs": 6}
    usual = small_data.config_for("snips", "usual", ROOT / "train.jsonl", 1, ROOT / "runs" / "x")
    assert (usual.method.lora.r, usual.train.lr, usual.train.batch_size, usual.data.val_ratio) == (8, 1e-4, 8, 0.0)
    assert (usual.data.seed, usual.train.seed, usual.model.name) == (1, 1, "smollm2-135m-instruct")
