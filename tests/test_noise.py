"""Label-noise finding: out-of-fold choice-scoring probabilities from K fold runs, then cleanlab."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from fewtune.cli import app
from fewtune.quality.noise import NoiseError, find_label_noise, softmax

from .conftest import write_jsonl

FLIPPED = (3, 10)  # 0-based rows whose label is planted wrong


@pytest.fixture
def noisy(tmp_path, tiny_model):
    """40 examples whose label follows from the text (apple: fruit, car: vehicle), two of them flipped, and a
    config that fits the tiny random model to it (full fine-tuning: a rank-8 adapter on random weights does not
    learn this in seconds)."""
    rows = []
    for i in range(20):
        rows += [{"text": f"red apple {i}", "label": "fruit"}, {"text": f"blue car {i}", "label": "vehicle"}]
    for i in FLIPPED:
        rows[i]["label"] = {"fruit": "vehicle", "vehicle": "fruit"}[rows[i]["label"]]
    config = tmp_path / "folds.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": tiny_model}, "data": {"train": "unused", "max_length": 64}, "method": {"name": "full"},
        "train": {"epochs": 30, "batch_size": 4, "lr": 3e-3, "warmup_ratio": 0.0, "seed": 1, "adapt_threads": False}}))
    return write_jsonl(tmp_path / "noisy.jsonl", rows), config


def test_planted_flips_are_found_with_the_right_label_and_the_search_resumes(noisy, tmp_path):
    data, config = noisy
    out = tmp_path / "noise"
    result = find_label_noise(data, out, config=config, folds=4, progress=False,
                              clean=tmp_path / "clean.jsonl", rejects=tmp_path / "rejects.jsonl")
    # the planted flips rank first (a borderline correct example may follow on some CPUs' rounding)
    assert sorted(x.line for x in result.issues[:2]) == [i + 1 for i in FLIPPED] and len(result.issues) <= 4
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for x in result.issues[:2]:  # the suggested label is the true one, and the models are sure of it
        assert x.given == rows[x.line - 1]["label"] and x.suggested != x.given and x.p_suggested > 0.8
    assert result.oof_accuracy >= 0.8
    oof = [json.loads(line) for line in (out / "oof_probs.jsonl").read_text().splitlines()]
    assert [r["line"] for r in oof] == list(range(1, 41)) and all(abs(sum(r["probs"].values()) - 1) < 1e-6 for r in oof)
    for k in range(4):  # no fold run saw an example it scored
        fold = out / "folds" / f"fold-{k}"
        scored = {r["line"] for r in map(json.loads, (fold / "probs.jsonl").read_text().splitlines())}
        trained = {json.loads(line)["messages"][0]["content"] for line in (fold / "train.jsonl").read_text().splitlines()}
        assert scored and not trained & {rows[n - 1]["text"] for n in scored}
    clean = [json.loads(line) for line in (tmp_path / "clean.jsonl").read_text().splitlines()]
    flagged = sorted(x.line for x in result.issues)
    assert len(clean) == 40 - len(flagged) and all(r in rows for r in clean)  # records as read, the flagged left out
    assert sorted(r["line"] for r in map(json.loads, (tmp_path / "rejects.jsonl").read_text().splitlines())) == flagged

    # a second call reads the folds' probabilities instead of training again, and can relabel instead
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("folds/fold-*/probs.jsonl")}
    again = find_label_noise(data, out, config=config, folds=4, progress=False, relabel=True,
                             clean=tmp_path / "relabelled.jsonl", rejects=tmp_path / "r2.jsonl")
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and again.fold_seconds == []
    relabelled = [json.loads(line) for line in (tmp_path / "relabelled.jsonl").read_text().splitlines()]
    assert len(relabelled) == 40
    assert all(relabelled[i]["label"] == ("fruit" if "apple" in relabelled[i]["text"] else "vehicle") for i in FLIPPED)


def test_sets_it_cannot_search_are_refused(tmp_path, tiny_model):
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "p", "completion": "c"}] * 6)
    with pytest.raises(NoiseError, match="classification"):
        find_label_noise(gen, tmp_path / "o", folds=2)
    few = write_jsonl(tmp_path / "few.jsonl", [{"text": f"t{i}", "label": "a" if i else "b"} for i in range(6)])
    with pytest.raises(NoiseError, match="fewer than --folds"):
        find_label_noise(few, tmp_path / "o", folds=3)
    with pytest.raises(NoiseError, match="together"):
        find_label_noise(few, tmp_path / "o", clean=tmp_path / "c.jsonl")
    result = CliRunner().invoke(app, ["data", "noise", str(few), "--out", str(tmp_path / "o"), "--folds", "3"])
    assert result.exit_code == 2 and "fewer than --folds 3" in result.output


def test_softmax_is_over_the_candidates():
    probs = softmax([-1.0, -2.0, -1000.0])
    assert abs(sum(probs) - 1) < 1e-12 and probs[0] > probs[1] > probs[2] >= 0
