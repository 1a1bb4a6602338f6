"""Ensembles: how members are combined (mean label probability, majority vote and its ties), what is refused,
and a tune's cross-validation ensemble scored for real on a tiny model, by `tune --ensemble` and by
`fewtune eval TUNE --ensemble`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fewtune.config import ConfigError
from fewtune.eval.ensemble import combine, evaluate_ensemble, tune_members, vote
from fewtune.eval.evaluate import EvalError, EvalResult
from tests.test_tune import Clock, FakeRuns, classification

LABELS = ["neg", "pos"]


def member(probs_pos: list[float], expected: list[str]) -> EvalResult:
    """A choice-scoring member result: P(pos) per example, as exact log-probabilities over 1-token labels."""
    records = []
    for i, (p, e) in enumerate(zip(probs_pos, expected)):
        lp = {"neg": math.log(1 - p), "pos": math.log(p)}
        records.append({"index": i, "line": i + 1, "input": f"text {i}", "expected": e,
                        "predicted": "pos" if p > 0.5 else "neg", "logprobs": lp, "n_tokens": {"neg": 1, "pos": 1},
                        "bounded": []})
    return EvalResult("classification", {"mode": "choice", "labels": LABELS}, records)


def test_mean_probability_overrules_a_narrow_majority():
    """Two members lean 'neg' slightly, one is sure of 'pos': the mean probability says 'pos', a vote 'neg'."""
    expected = ["pos", "neg"]
    members = [member([0.95, 0.1], expected), member([0.45, 0.2], expected), member([0.45, 0.3], expected)]
    metrics, records = combine("classification", members, examples=None)
    assert [r["members"] for r in records] == [["pos", "neg", "neg"], ["neg", "neg", "neg"]]
    assert [r["predicted"] for r in records] == ["pos", "neg"]
    assert records[0]["probability"] == pytest.approx((0.95 + 0.45 + 0.45) / 3, abs=1e-4)
    assert math.exp(records[1]["logprobs"]["pos"]) == pytest.approx(0.2, abs=1e-3)
    assert metrics["accuracy"] == 1.0 and metrics["labels"] == LABELS


def test_length_normalized_members_are_combined_on_per_token_means():
    # 'pos' is 2 tokens at -1.0 in all (-0.5 a token), 'neg' 1 token at -0.8: summed 'neg' wins, per token 'pos'
    rec = {"index": 0, "line": 1, "input": "x", "expected": "pos", "predicted": "pos",
           "logprobs": {"neg": -0.8, "pos": -1.0}, "n_tokens": {"neg": 1, "pos": 2}, "bounded": []}
    one = EvalResult("classification", {"mode": "choice", "labels": LABELS}, [rec])
    two = EvalResult("classification", {"mode": "choice", "labels": LABELS}, [dict(rec)])
    assert combine("classification", [one, two], None, normalize=False)[1][0]["predicted"] == "neg"
    assert combine("classification", [one, two], None, normalize=True)[1][0]["predicted"] == "pos"


def test_vote_majority_and_ties_go_to_the_earliest_member():
    assert vote(["a", " b", "b "]) == 1  # whitespace around an output does not split its votes
    assert vote(["a", "b"]) == 0
    assert vote(["a", "b", "c", "b", "c"]) == 1  # b and c tie at 2: b's first member comes before c's
    generated = [EvalResult("classification", {"mode": "generate", "labels": LABELS},
                            [{"index": 0, "line": 1, "input": "x", "expected": "pos", "predicted": p,
                              "correct": p == "pos"}]) for p in ("neg", "pos", "pos")]
    metrics, records = combine("classification", generated, None)
    assert records[0]["predicted"] == "pos" and metrics["accuracy"] == 1.0


def test_pruned_scores_and_mismatched_members_are_refused():
    a = member([0.9], ["pos"])
    pruned = member([0.9], ["pos"])
    pruned.predictions[0]["bounded"] = ["neg"]
    with pytest.raises(EvalError, match="scored exactly"):
        combine("classification", [a, pruned], None)
    with pytest.raises(EvalError, match="different numbers of examples"):
        combine("classification", [a, member([0.9, 0.2], ["pos", "neg"])], None)
    with pytest.raises(EvalError, match="at least two"):
        evaluate_ensemble(["one-run"], "data.jsonl")
    with pytest.raises(EvalError, match="given twice"):
        evaluate_ensemble(["a", "a"], "data.jsonl")


def test_tune_folder_without_folds_or_final_is_refused(tmp_path):
    with pytest.raises(EvalError, match="not a tune folder"):
        tune_members(tmp_path)
    (tmp_path / "runs.jsonl").write_text(json.dumps({"key": "k", "fold": 0, "params": {}, "run_dir": "x"}) + "\n",
                                         encoding="utf-8")
    with pytest.raises(EvalError, match="final model has not been trained"):
        tune_members(tmp_path)


def test_ensemble_needs_kfold_selection(tmp_path):
    data = classification(tmp_path / "train.jsonl", 48)
    dev = classification(tmp_path / "dev.jsonl", 8)
    clock = Clock()
    from fewtune.workflows.tune import tune

    with pytest.raises(ConfigError, match="needs k-fold selection"):
        tune(data, "tiny", trials=1, dev=dev, out=tmp_path / "tune", measure=False, progress=False, clock=clock,
             execute=FakeRuns(clock), ensemble=True)


def test_tune_lists_the_winners_fold_models_and_scores_the_ensemble_once(tmp_path, tiny_model):
    """With training and scoring stood in for: ensemble.json lists the final model and the winning trial's fold runs
    (those runs.jsonl records), the ensemble is scored once on --test, and the same command again reuses it."""
    from fewtune.workflows.tune import tune

    data = classification(tmp_path / "train.jsonl", 48)
    test_file = classification(tmp_path / "test.jsonl", 12)
    clock = Clock()
    calls = []

    def score(out, test, task, labels, cfg):
        calls.append((out, test, task))
        return {"metrics": {"accuracy": 0.75}, "eval_s": 1.0}

    kwargs = dict(trials=2, kfold=3, test=test_file, out=tmp_path / "tune", measure=False, progress=False,
                  clock=clock, ensemble=True, score_ensemble=score)
    result = tune(data, tiny_model, execute=FakeRuns(clock), **kwargs)
    out = tmp_path / "tune"
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text(encoding="utf-8").splitlines()]
    folds = sorted((r["fold"], r["run_dir"]) for r in runs if r.get("fold") is not None
                   and r["params"] == result.best.params)
    listed = json.loads((out / "ensemble.json").read_text(encoding="utf-8"))
    assert listed["members"] == [str(out / "final")] + [d for _, d in folds] and len(folds) == 3
    assert calls == [(out, test_file, "classification")] and listed["test"]["metrics"]["accuracy"] == 0.75
    alone = result.test["metrics"]["accuracy"]
    assert any(f"accuracy {0.75 - alone:+.4f} against the final model alone" in line for line in result.lines)
    again = tune(data, tiny_model, execute=FakeRuns(clock), **kwargs)
    assert len(calls) == 1 and again.ensemble["test"] == result.ensemble["test"]


@pytest.mark.slow
def test_real_cross_validation_ensemble_of_a_tune(tmp_path, tiny_model):
    """A real 2-fold tune with --ensemble: the final model and both fold models are scored on the test file; the
    first member is the final model (its score is the tune's own test score), the ensemble's probabilities are
    the mean of the members' (recomputed here from their prediction files), and `fewtune eval TUNE --ensemble`
    scores the same ensemble again."""
    from typer.testing import CliRunner

    from fewtune.cli import app
    from fewtune.workflows.tune import tune

    data = classification(tmp_path / "train.jsonl", 32)
    test_file = classification(tmp_path / "test.jsonl", 12)
    out = tmp_path / "tune"
    result = tune(data, tiny_model, trials=1, kfold=2, test=test_file, out=out, measure=False, progress=False,
                  search=("lr",), ensemble=True)
    members = result.ensemble["members"]
    assert members == tune_members(out) and len(members) == 3 and members[0] == str(out / "final")
    assert json.loads((out / "ensemble.json").read_text(encoding="utf-8"))["members"] == members
    ens = result.ensemble["test"]["metrics"]
    assert [m["target"] for m in ens["members"]] == members
    assert ens["members"][0]["accuracy"] == pytest.approx(result.test["metrics"]["accuracy"])
    assert any("cross-validation ensemble (3 models" in line for line in result.lines)

    folder = out / "eval_test_ensemble"
    per_member = [[json.loads(line) for line in (folder / "members" / str(k) / "predictions.jsonl")
                   .read_text(encoding="utf-8").splitlines()] for k in range(3)]
    combined = [json.loads(line) for line in (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    labels = ens["labels"]
    right = 0
    for i, rec in enumerate(combined):
        probs = []
        for rows in per_member:
            assert rows[i]["bounded"] == []  # every label scored exactly
            lps = [rows[i]["logprobs"][lab] for lab in labels]
            top = max(lps)
            z = sum(math.exp(v - top) for v in lps)
            probs.append([math.exp(v - top) / z for v in lps])
        mean = [sum(p[j] for p in probs) / 3 for j in range(len(labels))]
        assert rec["predicted"] == labels[max(range(len(labels)), key=lambda j: mean[j])]
        assert math.exp(rec["logprobs"][rec["predicted"]]) == pytest.approx(max(mean), abs=2e-3)
        right += rec["predicted"] == rec["expected"]
    assert ens["accuracy"] == pytest.approx(right / len(combined))

    cli = CliRunner().invoke(app, ["eval", str(out), "--ensemble", "--data", str(test_file), "-o",
                                   str(tmp_path / "again")])
    assert cli.exit_code == 0, cli.output
    again = json.loads((tmp_path / "again" / "results.json").read_text(encoding="utf-8"))
    assert again["settings"]["members"] == members
    assert again["metrics"]["accuracy"] == pytest.approx(ens["accuracy"])
    assert "each member alone" in cli.output
    bad = CliRunner().invoke(app, ["eval", str(out / "final"), "--ensemble", "--data", str(test_file)])
    assert bad.exit_code == 2 and "not a tune folder" in bad.output

    # pseudo-label --ensemble: the same three models label unlabeled prompts, the final model's config retrains
    unlabeled = tmp_path / "unlabeled.jsonl"
    unlabeled.write_text("".join(json.dumps({"text": f"please handle item {i} now"}) + "\n" for i in range(6)),
                         encoding="utf-8")
    pl = CliRunner().invoke(app, ["pseudo-label", str(out), "--ensemble", "--unlabeled", str(unlabeled), "--no-train",
                                  "--threshold", "0.3", "--out", str(tmp_path / "pl")])
    assert pl.exit_code == 0, pl.output
    summary = json.loads((tmp_path / "pl" / "round_1" / "summary.json").read_text(encoding="utf-8"))
    assert summary["ensemble"] == members and summary["pool"] == 6
