"""End to end on the real embedded model (SmolLM2-135M-Instruct): a short LoRA run on the
demo data, generation from the run directory, and the merged export giving the same text."""

import json

import pytest
from typer.testing import CliRunner

from fewtune.cli import app
from fewtune.config import GenerateSection
from fewtune.data.formats import load_examples
from fewtune.demo.run import TEST_FILE, demo_config
from fewtune.generate import generate, load_for_inference
from fewtune.train.loop import train

pytestmark = pytest.mark.slow


def test_real_model_lora_run_generate_and_merge(tmp_path):
    cfg = demo_config(str(tmp_path / "run"), ["train.max_steps=6", "eval.every=3", "train.batch_size=4"])
    result = train(cfg)
    records = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]  # lr 1e-3 on this task moves fast
    test = load_examples(TEST_FILE)[:4]
    gen = GenerateSection(max_new_tokens=40, batch_size=4)
    run_out = generate(load_for_inference(str(result.run_dir)), [e.prompt_messages for e in test], gen, progress=False)
    assert all(o[0] for o in run_out)
    out = CliRunner().invoke(app, ["export", str(result.run_dir), "--merged", str(tmp_path / "merged")])
    assert out.exit_code == 0, out.output
    merged_out = generate(load_for_inference(str(tmp_path / "merged")), [e.prompt_messages for e in test], gen,
                          progress=False)
    assert merged_out == run_out  # the merged model carries the run's template and behaves the same
