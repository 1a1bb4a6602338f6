"""`fewtune sweep`: grid expansion, k-fold splits, and whole sweeps on the tiny models."""

import json
import statistics
from collections import Counter
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fewtune.cli import app
from fewtune.config import ConfigError
from fewtune.data.formats import DataError, load_examples
from fewtune.workflows.sweep import (expand_grid, kfold_split, parse_grid, parse_seeds, read_sweep, resolve_seeds,
                                  sweep)
from tests.conftest import write_jsonl

LABELS = {"PlayMusic": ["play some jazz", "put on a song", "music please", "play queen"],
          "GetWeather": ["weather in paris", "will it rain", "forecast for rome"],
          "BookRestaurant": ["book a table", "dinner for two", "a pizzeria table"]}


@pytest.fixture
def intents(tmp_path) -> Path:
    rows = [{"text": f"{t} {k}", "label": label} for label, texts in LABELS.items() for t in texts for k in range(3)]
    return write_jsonl(tmp_path / "intents.jsonl", rows)  # 12 / 9 / 9 examples


@pytest.fixture
def base(make_config, intents, tmp_path):
    return make_config(data__train=str(intents), data__val_ratio=0.25, train__max_steps=2,
                       train__output_dir=str(tmp_path / "base"))


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def count_trainings(monkeypatch) -> list[str]:
    import fewtune.train.loop as loop

    calls, real = [], loop.train

    def counting(cfg, *args, **kwargs):
        calls.append(cfg.train.output_dir)
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(loop, "train", counting)
    return calls


# ---------------------------------------------------------------- grid and seeds


def test_grid_is_parsed_by_the_config_and_expanded_as_a_product(base):
    grid = parse_grid(["train.lr=1e-4,3e-4", "method.lora.r=4,8,16",
                       "method.lora.target_modules=[q_proj,v_proj],all-linear"], base)
    assert grid == {"train.lr": [1e-4, 3e-4], "method.lora.r": [4, 8, 16],
                    "method.lora.target_modules": [["q_proj", "v_proj"], "all-linear"]}
    combos = expand_grid(grid)
    assert len(combos) == 12 and len({json.dumps(c, sort_keys=True) for c in combos}) == 12
    assert combos[0] == {"train.lr": 1e-4, "method.lora.r": 4, "method.lora.target_modules": ["q_proj", "v_proj"]}
    assert combos[1]["method.lora.target_modules"] == "all-linear"  # last key varies fastest

    sample = expand_grid(grid, random_n=5, random_seed=1)
    assert len(sample) == 5 and len({json.dumps(c, sort_keys=True) for c in sample}) == 5
    assert all(c in combos for c in sample)
    assert sample == sorted(sample, key=combos.index)  # listed in grid order
    assert expand_grid(grid, random_n=5, random_seed=1) == sample  # seeded
    others = [expand_grid(grid, random_n=5, random_seed=s) for s in range(2, 8)]
    assert any(o != sample for o in others)
    assert expand_grid(grid, random_n=50) == combos  # more than the grid has: all of it
    assert expand_grid({}) == [{}]  # no grid: the config as is


def test_grid_errors_are_clear(base):
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        parse_grid(["train.lrr=1e-4,3e-4"], base)
    with pytest.raises(ConfigError, match="'train.lr' is given twice"):
        parse_grid(["train.lr=1e-4", "train.lr=3e-4"], base)
    for empty in ("train.lr=", "train.lr=1e-4,", "train.lr=,"):
        with pytest.raises(ConfigError, match="an empty value"):
            parse_grid([empty], base)
    with pytest.raises(ConfigError, match="value 0.001 is given twice"):
        parse_grid(["train.lr=1e-3,0.001"], base)
    with pytest.raises(ConfigError, match="method.lora.r"):
        parse_grid(["method.lora.r=4,0"], base)  # the schema's own range check
    with pytest.raises(ConfigError, match="use --seeds"):
        parse_grid(["train.seed=1,2"], base)
    with pytest.raises(ConfigError, match="not of the form"):
        parse_grid(["train.lr"], base)
    with pytest.raises(ConfigError, match="give --grid too"):
        sweep(base, random_n=2)
    with pytest.raises(ConfigError, match="--kfold must be at least 2"):
        sweep(base, kfold=1)
    with pytest.raises(ConfigError, match="also sets data.validation"):
        sweep(base.model_copy(update={"data": base.data.model_copy(update={"validation": base.data.train})}), kfold=3)
    with pytest.raises(ConfigError, match="not a classification metric"):
        sweep(base, metric="rouge1", seeds=1)


def test_seeds():
    assert parse_seeds("3") == 3 and parse_seeds("1,5,9") == [1, 5, 9]
    assert resolve_seeds(3, 42, None) == [42, 43, 44] and resolve_seeds([7, 1], 42, None) == [7, 1]
    assert resolve_seeds(None, 42, None) == [42, 43, 44]  # several seeds unless asked otherwise
    assert resolve_seeds(None, 42, 5) == [42]  # the folds are the samples
    with pytest.raises(ConfigError):
        parse_seeds("a,b")
    with pytest.raises(ConfigError):
        resolve_seeds([1, 1], 42, None)
    with pytest.raises(ConfigError):
        resolve_seeds(0, 42, None)


# ---------------------------------------------------------------- k-fold


def test_kfold_folds_are_disjoint_cover_the_set_and_are_stratified(intents, pc_data):
    examples = load_examples(intents)
    folds = kfold_split(examples, 3, seed=0)
    ids = [e.line for fold in folds for e in fold]
    assert sorted(ids) == sorted(e.line for e in examples) and len(set(ids)) == len(ids)
    assert [len(f) for f in folds] == [10, 10, 10]
    for fold in folds:  # 12 / 9 / 9 over 3 folds: 4 / 3 / 3 in each
        assert Counter(e.label for e in fold) == {"PlayMusic": 4, "GetWeather": 3, "BookRestaurant": 3}
    assert [[e.line for e in f] for f in kfold_split(examples, 3, seed=0)] == [[e.line for e in f] for f in folds]
    assert [[e.line for e in f] for f in kfold_split(examples, 3, seed=1)] != [[e.line for e in f] for f in folds]

    unlabeled = load_examples(pc_data)  # 40 examples, no labels
    folds = kfold_split(unlabeled, 4, seed=0)
    assert sorted(e.line for f in folds for e in f) == list(range(1, 41)) and {len(f) for f in folds} == {10}
    with pytest.raises(DataError, match="needs at least 50 examples"):
        kfold_split(unlabeled, 50, seed=0)


def test_sweep_and_data_split_make_the_same_folds(intents, pc_data, tmp_path):
    """One k-fold implementation: the sweep's folds are `fewtune data split --kfold`'s, whatever the data."""
    from fewtune.data.tools import split_file

    few = write_jsonl(tmp_path / "few.jsonl", [{"text": f"t{i}", "label": "rare" if i < 2 else "common"}
                                              for i in range(12)])  # 2 < K examples of one label: not stratified
    for path, k in ((intents, 3), (pc_data, 4), (few, 3)):
        for seed in (0, 7):
            split_file(path, tmp_path / "split", kfold=k, seed=seed)
            folds = kfold_split(load_examples(path), k, seed)
            for i, fold in enumerate(folds, start=1):
                written = load_examples(tmp_path / "split" / f"fold_{i}" / "validation.jsonl")
                assert [e.messages for e in written] == [e.messages for e in fold], (path.name, k, seed, i)


# ---------------------------------------------------------------- whole sweeps


def test_sweep_ranks_combinations_by_mean_over_seeds_and_resumes(base, tmp_path, monkeypatch):
    out = tmp_path / "sw"
    calls = count_trainings(monkeypatch)
    result = sweep(base, grid=["train.lr=1e-3,3e-2"], seeds=2, out=out)
    assert len(calls) == 4 and result.trained == 4
    records = lines(out / "sweep.jsonl")
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    assert {(r["params"]["train.lr"], r["seed"]) for r in records} == {(1e-3, 3), (1e-3, 4), (3e-2, 3), (3e-2, 4)}
    for r in records:
        run = Path(r["run_dir"])
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["train"]["lr"] == r["params"]["train.lr"] and cfg["train"]["seed"] == cfg["data"]["seed"] == r["seed"]
        # scored by the evaluation stage on this seed's held-out split
        evaluated = json.loads((run / "eval" / "results.json").read_text())
        assert evaluated["settings"]["data"] == cfg["data"]["validation"] == str(out / "data" / f"seed-{r['seed']}" / "validation.jsonl")
        assert r["metrics"]["accuracy"] == evaluated["metrics"]["accuracy"]
        held_out = load_examples(cfg["data"]["validation"])
        assert r["metrics"]["n"] == len(held_out) == 7  # 25% of 12 / 9 / 9, per label
        assert len(held_out) + len(load_examples(cfg["data"]["train"])) == 30
        assert r["metrics"]["val_loss"] == json.loads((run / "summary.json").read_text())["best_val_loss"]
    splits = [(out / "data" / f"seed-{s}" / "validation.jsonl").read_text() for s in (3, 4)]
    assert splits[0] != splits[1]  # each seed holds out its own split

    # the ranking is the mean accuracy over seeds, best first; std is the sample std
    expected = {}
    for lr in (1e-3, 3e-2):
        accs = [r["metrics"]["accuracy"] for r in records if r["params"]["train.lr"] == lr]
        expected[lr] = (statistics.fmean(accs), statistics.stdev(accs))
    means = [row["stats"]["accuracy"]["mean"] for row in result.rows]
    assert means == sorted(means, reverse=True)
    for row in result.rows:
        mean, std = expected[row["params"]["train.lr"]]
        assert row["stats"]["accuracy"]["mean"] == pytest.approx(mean)
        assert row["stats"]["accuracy"]["std"] == pytest.approx(std)
        assert row["ok"] == 2 and row["failed"] == 0
    md = (out / "sweep.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| rank | train.lr | runs | accuracy | macro_f1 | val_loss |")
    best = result.rows[0]["params"]["train.lr"]
    assert table[1].startswith(f"| 1 | {best} | 2 | {expected[best][0]:.4f} ± {expected[best][1]:.4f} |")

    # the same command again trains nothing; a third seed trains only the two new runs
    calls.clear()
    assert sweep(base, grid=["train.lr=1e-3,3e-2"], seeds=2, out=out).trained == 0 and calls == []
    again = sweep(base, grid=["train.lr=1e-3,3e-2"], seeds=3, out=out)
    assert again.trained == 2 and len(calls) == 2 and all(c.endswith("seed-5") for c in calls)
    assert len(lines(out / "sweep.jsonl")) == 6 and all(row["ok"] == 3 for row in again.rows)
    # another base config must not mix with these records
    with pytest.raises(ConfigError, match="different sweep"):
        sweep(base.model_copy(update={"train": base.train.model_copy(update={"max_steps": 3})}),
              grid=["train.lr=1e-3,3e-2"], seeds=2, out=out)


def test_a_sweep_recorded_before_the_keys_moved_goes_on(base, tmp_path, monkeypatch):
    """Its records carry the fingerprint of the config as it was then laid out (train.eval_*, no eval section,
    regularise.replay and regularise.curriculum)."""
    import hashlib

    out = tmp_path / "sw"
    calls = count_trainings(monkeypatch)
    sweep(base, seeds=1, out=out)
    then = base.model_dump(mode="json")
    for key in ("output_dir", "resume"):
        then["train"].pop(key)
    now_eval = then.pop("eval")
    then["train"].update({f"eval_{k}": now_eval[k] for k in ("every", "task", "mode", "metric", "sample")},
                         early_stopping=now_eval["early_stopping"])
    then["regularise"].update(replay=then["data"].pop("replay"), curriculum=then["data"].pop("curriculum"))
    old = hashlib.sha256(json.dumps({"config": then, "eval_data": None, "kfold": None}, sort_keys=True)
                         .encode()).hexdigest()[:16]
    records = lines(out / "sweep.jsonl")
    assert len(records) == 1 and records[0]["sweep"] != old
    (out / "sweep.jsonl").write_text("".join(json.dumps({**r, "sweep": old}) + "\n" for r in records))
    calls.clear()
    assert sweep(base, seeds=1, out=out).trained == 0 and calls == []  # the recorded run counts
    changed = base.model_copy(update={"eval": base.eval.model_copy(update={"every": 7})})
    with pytest.raises(ConfigError, match="different sweep"):  # and a real change is still one
        sweep(changed, seeds=1, out=out)


def test_failed_run_is_recorded_and_shown_and_the_sweep_goes_on(base, tmp_path, monkeypatch):
    out = tmp_path / "sw"
    # lr 1e30 blows the weights up after the first step: the loss becomes non-finite (TrainingError)
    result = sweep(base, grid=["train.lr=1e-3,1e30"], seeds=2, out=out, eval_data=base.data.train)
    records = lines(out / "sweep.jsonl")
    assert [r["status"] for r in records] == ["ok", "ok", "failed", "failed"]
    assert all(r["error"].startswith("TrainingError: the loss became") for r in records[2:])
    assert [row["params"]["train.lr"] for row in result.rows] == [1e-3, 1e30]  # failed combination last
    assert result.rows[1]["ok"] == 0 and result.rows[1]["failed"] == 2
    md = (out / "sweep.md").read_text()
    assert "| - | 1e+30 | 0 (2 failed) | failed |" in md
    assert "## Failed runs (2)" in md and md.count("TrainingError: the loss became") == 2
    # eval data scored in full on every finished run
    assert all(r["metrics"]["n"] == 30 for r in records[:2])

    calls = count_trainings(monkeypatch)
    assert sweep(base, grid=["train.lr=1e-3,1e30"], seeds=2, out=out, eval_data=base.data.train).trained == 0
    retried = sweep(base, grid=["train.lr=1e-3,1e30"], seeds=2, out=out, eval_data=base.data.train, retry_failed=True)
    assert retried.trained == 2 and len(calls) == 2
    assert len(read_sweep(out / "sweep.jsonl")) == 4 and len(lines(out / "sweep.jsonl")) == 6


def test_cli_kfold_sweep(base, tmp_path):
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(base.model_dump(mode="json")))
    out = tmp_path / "kf"
    res = CliRunner().invoke(app, ["sweep", str(config), "train.max_steps=1", "--kfold", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    records = lines(out / "sweep.jsonl")
    assert [(r["seed"], r["fold"]) for r in records] == [(3, 0), (3, 1), (3, 2)]
    assert all(r["status"] == "ok" and r["metrics"]["n"] == 10 and r["steps"] == 1 for r in records)
    held_out = [load_examples(out / "data" / f"fold-{i}" / "validation.jsonl") for i in range(3)]
    texts = [e.messages[0].content for f in held_out for e in f]
    assert sorted(texts) == sorted(e.messages[0].content for e in load_examples(base.data.train))
    for i in range(3):  # each fold trains on the other two
        trained = {e.messages[0].content for e in load_examples(out / "data" / f"fold-{i}" / "train.jsonl")}
        assert trained == set(texts) - {e.messages[0].content for e in held_out[i]} and len(trained) == 20
    accs = [r["metrics"]["accuracy"] for r in records]
    assert f"{statistics.fmean(accs):.4f} ± {statistics.stdev(accs):.4f}" in res.output
    assert "held-out fold of 3" in (out / "sweep.md").read_text()

    # `fewtune data split --kfold` with the same seed (the sweep's data.seed) writes the same folds
    split = CliRunner().invoke(app, ["data", "split", str(base.data.train), "--out-dir", str(tmp_path / "split"),
                                     "--kfold", "3", "--seed", str(base.data.seed)])
    assert split.exit_code == 0, split.output
    for i in range(3):
        written = [e.messages[0].content for e in load_examples(tmp_path / "split" / f"fold_{i + 1}" / "validation.jsonl")]
        assert written == [e.messages[0].content for e in held_out[i]]

    bad = CliRunner().invoke(app, ["sweep", str(config), "--grid", "method.lora.rr=4,8", "--out", str(out)])
    assert bad.exit_code == 2 and "did you mean 'method.lora.r'" in bad.output


def test_interrupted_run_continues_from_its_checkpoint(base, tmp_path, monkeypatch):
    import fewtune.train.loop as loop
    from fewtune.workflows.sweep import SweepInterrupted

    out, real, calls = tmp_path / "sw", loop.train, []

    def stopping(cfg, run_dir=None, resume=None, stop_after=None):
        calls.append(resume)
        return real(cfg, run_dir, resume=resume, stop_after=1 if len(calls) == 1 else None)  # Ctrl-C after step 1

    monkeypatch.setattr(loop, "train", stopping)
    with pytest.raises(SweepInterrupted, match="Run the same command again"):
        sweep(base, seeds=1, out=out)
    assert not (out / "sweep.jsonl").exists()  # an interrupted run is not recorded as finished or failed
    result = sweep(base, seeds=1, out=out)
    assert calls == [False, True] and result.trained == 1
    record = lines(out / "sweep.jsonl")[0]
    assert record["status"] == "ok" and record["steps"] == 2
    steps = [m["step"] for m in lines(Path(record["run_dir"]) / "metrics.jsonl") if "train_loss" in m]
    assert steps == [1, 2]  # step 1 from the first attempt, step 2 after resuming
