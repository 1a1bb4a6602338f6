"""fewtune doctor on synthetic curves, one per diagnosis, and on a real (tiny) run."""

import json
import math

import pytest

from fewtune.advice.doctor import diagnose, read_curves
from tests.conftest import write_jsonl


def run_dir(tmp_path, train_losses, val_losses=(), eval_every=10, extra=None, grad=1.0):
    rows = [{"step": 0, "event": "start"}]
    for i, loss in enumerate(train_losses, 1):
        rows.append({"step": i, "epoch": i / 100, "train_loss": loss, "lr": 1e-4, "grad_norm": grad})
        if i % eval_every == 0 and i // eval_every <= len(val_losses):
            k = i // eval_every - 1
            rows.append({"step": i, "val_loss": val_losses[k], "best": False, **((extra or {}).get(k, {}))})
    folder = tmp_path / "run"
    folder.mkdir(exist_ok=True)
    write_jsonl(folder / "metrics.jsonl", rows)
    return folder


def kinds(findings):
    return [f.kind for f in findings]


def test_overfitting_found_with_the_turning_step(tmp_path):
    train = [2.0 - 0.03 * i for i in range(60)]
    val = [1.8, 1.5, 1.3, 1.4, 1.6, 1.9]  # best at the third evaluation (step 30)
    found = diagnose(run_dir(tmp_path, train, val))
    over = [f for f in found if f.kind == "overfitting"]
    assert len(over) == 1 and over[0].numbers["best_step"] == 30
    assert "step 30" in over[0].message and "1.3000" in over[0].message and "1.9000" in over[0].message
    assert any("fewer steps" in s for s in over[0].suggestions)


def test_underfitting_found_on_high_flat_curves(tmp_path):
    train = [3.0 - 0.001 * i for i in range(50)]
    found = diagnose(run_dir(tmp_path, train, [3.0, 2.99, 2.99, 2.98, 2.98]))
    under = [f for f in found if f.kind == "underfitting"]
    assert len(under) == 1 and under[0].numbers["drop"] < 0.1 and "raise train.lr" in under[0].suggestions
    assert "overfitting" not in kinds(found)


def test_a_run_that_ends_while_validation_still_falls_is_still_improving(tmp_path):
    # the car-command run of 30 steps: doubling its steps doubled exact match (benchmarks/results/augment.md)
    train = [1.3 - 0.04 * i for i in range(30)]
    found = diagnose(run_dir(tmp_path, train, [0.554, 0.2571, 0.1705, 0.1391, 0.1317, 0.1284], eval_every=5))
    still = [f for f in found if f.kind == "still_improving"]
    assert len(still) == 1 and still[0].numbers["mid_step"] == 15 and still[0].numbers["last_step"] == 30
    assert "0.1705" in still[0].message and "-25%" in still[0].message
    assert any("train more epochs" in s for s in still[0].suggestions)
    assert "ok" not in kinds(found) and "overfitting" not in kinds(found)


@pytest.mark.parametrize("val", [
    [0.9, 0.3, 0.2, 0.195, 0.19, 0.19],  # converged: it fell by 5% over the second half
    [1.8, 1.5, 1.3, 1.4, 1.6, 1.9],  # turned up: that is overfitting's finding, not this one
    [0.5, 0.3, 0.2],  # too few evaluations to tell
])
def test_converged_turned_or_short_curves_are_not_still_improving(tmp_path, val):
    found = diagnose(run_dir(tmp_path, [2.0 - 0.03 * i for i in range(60)], val))
    assert "still_improving" not in kinds(found)


def test_a_tie_at_the_end_still_counts_as_lowest_at_the_end(tmp_path):
    found = diagnose(run_dir(tmp_path, [1.3 - 0.02 * i for i in range(60)], [0.30, 0.16, 0.0756, 0.0498, 0.0475, 0.0475]))
    assert "still_improving" in kinds(found)


def test_low_flat_curve_is_not_underfitting(tmp_path):
    found = diagnose(run_dir(tmp_path, [0.2] * 50, [0.25] * 5))
    assert kinds(found)[0] == "ok" and "underfitting" not in kinds(found)


def test_spikes_and_nan_are_instability(tmp_path):
    train = [1.0 - 0.005 * i for i in range(40)]
    train[25] = 5.0
    found = diagnose(run_dir(tmp_path, train, [1.0, 0.9, 0.85, 0.8]))
    spike = [f for f in found if f.kind == "instability"]
    assert len(spike) == 1 and spike[0].numbers["first_step"] == 26 and spike[0].numbers["spikes"] == 1
    train[30] = float("nan")
    found = diagnose(run_dir(tmp_path, train, [1.0, 0.9, 0.85, 0.8]))
    assert any(f.kind == "instability" and "NaN" in f.message and f.numbers["first_step"] == 31 for f in found)


def _batch_one_curve(n=600, seed=0):
    """Per-example losses, as batch-1 training logs them: a falling trend times heavy-tailed noise."""
    import random

    rng = random.Random(seed)
    return [max(0.02, 2.0 * math.exp(-i / 150)) * rng.lognormvariate(0, 1.2) for i in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_noisy_small_batch_curve_is_not_instability(tmp_path, seed):
    found = diagnose(run_dir(tmp_path, _batch_one_curve(seed=seed), [1.0, 0.6, 0.4, 0.3, 0.25], eval_every=100))
    assert "instability" not in kinds(found)
    note = [f for f in found if f.kind == "note"]
    assert len(note) == 1 and note[0].numbers["single_step_spikes"] > 0.1 * note[0].numbers["steps_checked"]
    # the same noise with a real blow-up (the loss jumps and stays up for 40 steps) is still caught
    train = _batch_one_curve(seed=seed)
    train[300:340] = [v * 20 + 3.0 for v in train[300:340]]
    found = diagnose(run_dir(tmp_path, train, [1.0, 0.6, 0.4, 0.3, 0.25], eval_every=100))
    spike = [f for f in found if f.kind == "instability"]
    assert len(spike) == 1 and spike[0].numbers["first_step"] == 301, spike[0].message
    assert spike[0].numbers["sustained_over"] == 25


def test_tiny_absolute_rises_are_not_spikes(tmp_path):
    train = [0.01] * 40
    train[25] = 0.05  # 5x, but 0.04 nats
    assert "instability" not in kinds(diagnose(run_dir(tmp_path, train, [0.02, 0.02, 0.02, 0.02])))


def test_loss_metric_gap(tmp_path):
    train = [2.0 - 0.02 * i for i in range(50)]
    val = [1.5, 1.2, 1.25, 1.3, 1.32]
    acc = {0: {"accuracy": 0.5}, 1: {"accuracy": 0.6}, 2: {"accuracy": 0.7}, 3: {"accuracy": 0.78},
           4: {"accuracy": 0.8}}
    found = diagnose(run_dir(tmp_path, train, val, extra=acc))
    gap = [f for f in found if f.kind == "loss_metric_gap"]
    assert len(gap) == 1 and gap[0].numbers["best_loss_step"] == 20 and gap[0].numbers["best_metric_step"] == 50
    assert gap[0].numbers["metric_at_best_loss"] == 0.6


def test_loss_metric_gap_is_one_finding_led_by_the_selecting_metric(tmp_path):
    # every logged metric peaks away from the loss minimum: one finding, led by the metric that chose checkpoints
    train = [2.0 - 0.02 * i for i in range(50)]
    val = [1.5, 1.2, 1.25, 1.3, 1.32]
    extra = {k: {"val_accuracy": a, "val_macro_f1": a - 0.1, "val_weighted_f1": a - 0.05}
             for k, a in enumerate([0.5, 0.6, 0.7, 0.78, 0.8])}
    folder = run_dir(tmp_path, train, val, extra=extra)
    gap = [f for f in diagnose(folder) if f.kind == "loss_metric_gap"]
    assert len(gap) == 1 and gap[0].numbers["metric"] == "val_accuracy"
    assert gap[0].numbers["others"] == {"val_macro_f1": 50, "val_weighted_f1": 50}
    assert gap[0].suggestions[0].startswith("choose the checkpoint by the task metric")
    with (folder / "metrics.jsonl").open("a") as f:  # the run chose its checkpoints by macro-F1
        f.write(json.dumps({"step": 50, "event": "end", "eval_metric": "macro_f1"}) + "\n")
    found = diagnose(folder)
    gap = [f for f in found if f.kind == "loss_metric_gap"]
    assert gap[0].numbers["metric"] == "val_macro_f1" and "already kept" in gap[0].suggestions[0]
    overfit = [f for f in found if f.kind == "overfitting"]
    assert overfit and "best macro_f1 instead" in overfit[0].suggestions[0]


def test_label_collapse_needs_predictions(tmp_path):
    folder = run_dir(tmp_path, [1.0 - 0.01 * i for i in range(30)], [0.9, 0.8, 0.7])
    found = diagnose(folder)
    assert any(f.kind == "unknown" and "cannot tell" in f.message for f in found)
    rows = [{"prediction": "play_music", "reference": r} for r in ["play_music", "weather", "book", "rate"] * 5]
    rows[0]["prediction"] = "weather"
    write_jsonl(folder / "predictions.jsonl", rows)
    collapse = [f for f in diagnose(folder) if f.kind == "label_collapse"]
    assert len(collapse) == 1 and collapse[0].numbers["share"] == pytest.approx(0.95)
    assert collapse[0].numbers["reference_share"] == pytest.approx(0.25)
    balanced = [{"prediction": r, "reference": r} for r in ["a", "b", "c"] * 5]
    write_jsonl(folder / "predictions.jsonl", balanced)
    assert "label_collapse" not in kinds(diagnose(folder))


def test_predictions_of_fewtune_eval_are_found(tmp_path):
    """`fewtune eval RUN` writes RUN/eval/predictions.jsonl: doctor reads it without --predictions."""
    folder = run_dir(tmp_path, [1.0 - 0.01 * i for i in range(30)], [0.9, 0.8, 0.7])
    (folder / "eval").mkdir()
    write_jsonl(folder / "eval" / "predictions.jsonl", [{"predicted": "x", "expected": r} for r in "abcx" * 5])
    collapse = [f for f in diagnose(folder) if f.kind == "label_collapse"]
    assert len(collapse) == 1 and collapse[0].numbers["class"] == "x"


def test_bad_input_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        diagnose(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 1.0}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_curves(tmp_path)


def test_doctor_reads_a_real_run(make_config):
    from typer.testing import CliRunner

    from fewtune.cli import app
    from fewtune.train.loop import train

    result = train(make_config(train__max_steps=6, eval__every=2))
    curves = read_curves(result.run_dir)
    assert len(curves.train) == 6 and len(curves.val) >= 3 and all(math.isfinite(v) for _, v in curves.train)
    out = CliRunner().invoke(app, ["doctor", str(result.run_dir), "--json"])
    assert out.exit_code == 0, out.output
    assert {f["kind"] for f in json.loads(out.stdout)} <= {"ok", "overfitting", "underfitting", "instability",
                                                             "loss_metric_gap", "unknown", "note"}
