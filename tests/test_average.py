"""Checkpoint averaging: the best evaluations' weights kept during training, and `export --average`."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fewtune.average import AverageError, average_weights, parse_spec, select
from fewtune.cli import app
from fewtune.generate import load_for_inference
from fewtune.train import checkpoint as ckpt
from fewtune.train.loop import train
from fewtune.train.validate import update_ranking


def test_ranking_keeps_the_best_k_as_training_picks_its_best():
    ranked = []
    for step, loss in [(1, 0.9), (2, 0.5), (3, 0.7), (4, 0.6), (5, 0.95)]:
        update_ranking(ranked, {"step": step, "val_loss": loss, "metric": None}, "loss", 3)
    assert [e["step"] for e in ranked] == [2, 4, 3]
    ranked = []
    entered = [update_ranking(ranked, {"step": s, "val_loss": loss, "metric": acc}, "accuracy", 2)
               for s, loss, acc in [(1, 0.5, 0.8), (2, 0.4, 0.9), (3, 0.3, 0.8), (4, 0.6, 0.9), (5, 0.2, 0.7)]]
    # higher accuracy first; equal accuracy: the lower loss (step 2's 0.4 before step 4's 0.6)
    assert [e["step"] for e in ranked] == [2, 4] and entered == [True, True, True, True, False]


def test_spec_is_checked():
    assert parse_spec("best:3") == ("best", 3) and parse_spec(" last:12 ") == ("last", 12)
    for bad in ("best", "best:0", "top:3", "last:-1", "best:2.5"):
        with pytest.raises(AverageError, match="best:K or last:K"):
            parse_spec(bad)


def test_keep_ranked_removes_what_the_ranking_dropped(tmp_path):
    weights = {"w": torch.ones(2)}
    for step in (1, 2, 3):
        ckpt.keep_ranked(tmp_path, [{"step": s, "val_loss": 1.0, "metric": None} for s in range(1, step + 1)],
                         weights, step)
    # a resume from an earlier checkpoint: its ranking names steps 1 and 2 only
    ckpt.keep_ranked(tmp_path, [{"step": 2, "val_loss": 0.5, "metric": None}, {"step": 1, "val_loss": 1.0, "metric": None}],
                     None, 2)
    root = tmp_path / ckpt.RANKED
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-0000001", "step-0000002"]
    assert [e["step"] for e in json.loads((root / "ranking.json").read_text())] == [2, 1]


@pytest.fixture
def ranked_run(make_config, tmp_path):
    """A tiny LoRA run evaluated at every step, keeping its 3 best evaluations and 3 checkpoints."""
    run = tmp_path / "run"
    train(make_config(train__max_steps=6, eval__every=1, eval__early_stopping__enabled=False, train__keep_best=3,
                      train__save_every=2, train__keep_checkpoints=3, train__lr=5e-3, train__output_dir=str(run)))
    return run


def _val_losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def test_training_keeps_the_three_best_evaluations(ranked_run):
    losses = _val_losses(ranked_run)
    assert len(losses) >= 5
    ranking = json.loads((ranked_run / ckpt.RANKED / "ranking.json").read_text())
    expected = sorted(losses, key=losses.get)[:3]
    assert [e["step"] for e in ranking] == expected
    assert [e["val_loss"] for e in ranking] == pytest.approx([losses[s] for s in expected])
    folders = sorted(p.name for p in (ranked_run / ckpt.RANKED).iterdir() if p.is_dir())
    assert folders == sorted(f"step-{s:07d}" for s in expected)
    # the top of the ranking is best/: the same weights
    top = ckpt.load_weights(ckpt.ranked_folder(ranked_run, expected[0]))
    best = ckpt.load_weights(ranked_run / "best")
    assert top.keys() == best.keys() and all(torch.equal(top[k], best[k]) for k in top)
    # and the three differ from each other (each saved at its own step)
    second = ckpt.load_weights(ckpt.ranked_folder(ranked_run, expected[1]))
    assert any(not torch.equal(top[k], second[k]) for k in top)


def test_export_average_writes_a_run_with_the_mean_weights(ranked_run, tmp_path):
    out = tmp_path / "avg"
    result = CliRunner().invoke(app, ["export", str(ranked_run), "--average", "best:3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"averaged run written to {out}" in result.output
    sources = select(ranked_run, "best:3")
    mean = average_weights([s.folder for s in sources])
    by_hand = {k: sum(ckpt.load_weights(s.folder)[k] for s in sources) / 3 for k in mean}
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(saved) == len(mean)
    for name, value in mean.items():
        torch.testing.assert_close(value, by_hand[name])
        torch.testing.assert_close(saved[name.replace(".default", "")], value)
    record = json.loads((out / "averaged.json").read_text())
    assert [c["step"] for c in record["checkpoints"]] == [s.step for s in sources]
    # a run like any other: it loads, and answers with its own (averaged) weights
    avg, best = load_for_inference(str(out), precision="no"), load_for_inference(str(ranked_run), precision="no")
    ids = torch.tensor([avg.tokenizer("打开车窗 3").input_ids])
    with torch.no_grad():
        assert not torch.allclose(avg.model(ids).logits, best.model(ids).logits)
    # and merges like any run
    merged = CliRunner().invoke(app, ["export", str(out), "--merged", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output


def test_last_k_and_the_errors_users_meet(ranked_run, tmp_path):
    ok = CliRunner().invoke(app, ["export", str(ranked_run), "--average", "last:2"])
    assert ok.exit_code == 0, ok.output
    out = ranked_run.with_name("run-avg-last2")
    steps = [c["step"] for c in json.loads((out / "averaged.json").read_text())["checkpoints"]]
    assert steps == [6, 4]  # save_every 2: the two newest checkpoints
    for args, message in [(["--average", "best:4"], "Train with train.keep_best >= 4"),
                          (["--average", "last:5"], "train.keep_checkpoints >= 5"),
                          (["--average", "best"], "best:K or last:K"),
                          (["--average", "last:2"], "exists and is not empty"),  # the default output, written above
                          ([], "--merged DIR"),
                          (["--out", str(tmp_path / "x")], "--out names the averaged run")]:
        result = CliRunner().invoke(app, ["export", str(ranked_run), *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)


def test_full_fine_tuning_runs_average_their_trainable_layers(make_config, tmp_path):
    run = tmp_path / "full"
    train(make_config(method__name="full", train__max_steps=4, eval__every=1, eval__early_stopping__enabled=False,
                      train__keep_best=2, train__lr=1e-3, train__output_dir=str(run)))
    out = CliRunner().invoke(app, ["export", str(run), "--average", "best:2", "--out", str(tmp_path / "avg")])
    assert out.exit_code == 0, out.output
    sources = select(run, "best:2")
    mean = average_weights([s.folder for s in sources])
    loaded = load_for_inference(str(tmp_path / "avg"), precision="no")
    params = dict(loaded.model.named_parameters())
    for name, value in mean.items():
        torch.testing.assert_close(params[name].detach(), value.float())


def test_a_resume_from_an_earlier_checkpoint_forgets_later_rankings(ranked_run, make_config):
    """Resuming from step 4's checkpoint (step 6's removed, as a crash before it was written would leave it):
    best-ranked/ holds what the ranking held at step 4 and still has weights for (steps 5 and 6 pushed the
    others out), and the resumed run ranks steps 5 and 6 again."""
    import shutil

    shutil.rmtree(ranked_run / "checkpoints" / "step-0000006")
    (ranked_run / "checkpoints" / "latest").write_text("step-0000004")
    at_4 = ckpt.read_loop_state(ranked_run / "checkpoints" / "step-0000004")["ranked"]
    assert all(e["step"] <= 4 for e in at_4) and len(at_4) == 3
    still_there = [e for e in at_4 if ckpt.ranked_folder(ranked_run, e["step"]).is_dir()]
    assert len(still_there) < 3  # the run's end pushed some of them out
    # resumed with nothing left to do (max_steps 4): no evaluation runs, best-ranked/ is step 4's ranking
    train(make_config(train__max_steps=4, eval__every=1, eval__early_stopping__enabled=False, train__keep_best=3,
                      train__save_every=2, train__keep_checkpoints=3, train__lr=5e-3, train__output_dir=str(ranked_run)),
          resume=True)
    assert json.loads((ranked_run / ckpt.RANKED / "ranking.json").read_text()) == still_there
    assert sorted(p.name for p in (ranked_run / ckpt.RANKED).iterdir() if p.is_dir()) == \
        sorted(f"step-{e['step']:07d}" for e in still_there)
    short = CliRunner().invoke(app, ["export", str(ranked_run), "--average", "best:3"])
    assert short.exit_code == 2 and f"kept {len(still_there)}" in short.output
    train(make_config(train__max_steps=6, eval__every=1, eval__early_stopping__enabled=False, train__keep_best=3,
                      train__save_every=2, train__keep_checkpoints=3, train__lr=5e-3, train__output_dir=str(ranked_run)),
          resume=True)
    losses = _val_losses(ranked_run)
    ranking = json.loads((ranked_run / ckpt.RANKED / "ranking.json").read_text())
    assert [e["step"] for e in ranking] == sorted(losses, key=losses.get)[:3]
    assert sorted(p.name for p in (ranked_run / ckpt.RANKED).iterdir() if p.is_dir()) == \
        sorted(f"step-{e['step']:07d}" for e in ranking)
