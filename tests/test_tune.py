"""fewtune tune: the search space, honest selection (the test file is read only by the final model), the
budget on a mocked clock, resuming an interrupted tune, and a real tune of a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from fewtune.config import ConfigError, load_config
from fewtune.workflows import tune as tune_module
from fewtune.workflows.tune import TuneInterrupted, base_params, parse_budget, search_space, tune
from tests.conftest import write_jsonl

LABELS = ["music", "weather", "book", "rate"]


def classification(path: Path, n: int) -> Path:
    rows = [{"text": f"request number {i} about {LABELS[i % 4]}", "label": LABELS[i % 4]} for i in range(n)]
    return write_jsonl(path, rows)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeRuns:
    """Stands in for training + scoring: the held-out accuracy peaks at lr 4e-4 and 4 epochs; each run
    advances the mocked clock; per-example predictions are written as `fewtune eval` writes them."""

    def __init__(self, clock: Clock, seconds: float = 60.0, fail_at: int | None = None, per_epoch: bool = False):
        # per_epoch: a run takes ``seconds`` per epoch per 48 training examples, as real training does
        self.clock, self.seconds, self.fail_at, self.per_epoch = clock, seconds, fail_at, per_epoch
        self.calls: list[tuple[str | None, dict]] = []

    def __call__(self, cfg, run_dir, scored_file, task, labels):
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt
        self.calls.append((scored_file, {"lr": cfg.train.lr, "epochs": cfg.train.epochs,
                                         "batch_size": cfg.train.batch_size, "r": cfg.method.lora.r}))
        if self.per_epoch:
            rows = len(Path(cfg.data.train).read_text(encoding="utf-8").splitlines())
            self.clock.now += self.seconds * cfg.train.epochs * rows / 48
        else:
            self.clock.now += self.seconds
        if scored_file is None:
            return {"metrics": {}, "train_s": self.seconds, "eval_s": 0.0}
        quality = 1.0 - 0.15 * abs(math.log(cfg.train.lr / 4e-4)) - 0.05 * abs(cfg.train.epochs - 4)
        rows = [json.loads(line) for line in Path(scored_file).read_text(encoding="utf-8").splitlines()]
        preds = []
        for i, row in enumerate(rows):
            expected = row.get("label") or row["messages"][-1]["content"]
            right = (i * 0.37) % 1.0 < quality
            preds.append({"index": i, "expected": expected,
                          "predicted": expected if right else LABELS[(LABELS.index(expected) + 1) % 4]})
        (Path(run_dir) / "eval").mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "eval" / "predictions.jsonl").write_text(
            "".join(json.dumps(p) + "\n" for p in preds), encoding="utf-8")
        acc = sum(p["expected"] == p["predicted"] for p in preds) / len(preds)
        return {"metrics": {"accuracy": acc}, "train_s": self.seconds, "eval_s": 0.0}

    @property
    def fold_calls(self) -> list:
        return [c for c in self.calls if c[0] is not None and "fold-" in c[0]]


@pytest.fixture
def data(tmp_path) -> Path:
    return classification(tmp_path / "train.jsonl", 48)


def test_search_space_contains_suggests_settings_and_rejects_unknown_names(tmp_path, tiny_model, data):
    from fewtune.advice.suggest import suggest

    cfg = suggest(data, tiny_model, measure=False, progress=False).config
    dims = search_space(cfg, 32, ("lr", "epochs", "batch_size", "r", "label_smoothing", "neftune", "dropout"))
    first = base_params(cfg, dims)
    for d in dims:
        value = first[d.name]
        if d.kind == "choice":
            assert value in d.choices, d
        else:
            assert d.low <= value <= d.high, d
    lr = next(d for d in dims if d.name == "lr")
    assert lr.low == pytest.approx(first["lr"] / 4) and lr.high == pytest.approx(first["lr"] * 4)
    batch = next(d for d in dims if d.name == "batch_size")
    assert all(math.ceil(32 / b) >= 8 for b in batch.choices if b != first["batch_size"])
    with pytest.raises(ConfigError, match="unknown setting"):
        search_space(cfg, 32, ("lr", "warmup"))
    full = cfg.model_copy(update={"method": cfg.method.model_copy(update={"name": "full"})})
    with pytest.raises(ConfigError, match="LoRA rank"):
        search_space(full, 32, ("r",))


def test_parse_budget():
    assert parse_budget("30m") == 1800
    assert parse_budget("1h30m") == 5400
    assert parse_budget("90s") == 90
    for bad in ("30", "soon", "0m"):
        with pytest.raises(ConfigError):
            parse_budget(bad)


def test_kfold_selection_never_reads_the_test_file_before_the_end(tmp_path, tiny_model, data, monkeypatch):
    test_file = classification(tmp_path / "test.jsonl", 20)
    reads: list[str] = []
    real_load = tune_module.load_examples

    def spy(path, *args, **kwargs):
        reads.append(str(Path(path).resolve()))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(tune_module, "load_examples", spy)
    clock = Clock()
    runs = FakeRuns(clock)
    result = tune(data, tiny_model, trials=4, kfold=3, test=test_file, out=tmp_path / "tune", measure=False,
                  progress=False, clock=clock, execute=runs)
    assert str(test_file.resolve()) not in reads
    scored = [c[0] for c in runs.calls]
    assert scored[-1] == str(test_file) and str(test_file) not in scored[:-1]  # the final model only
    # every fold run is scored on its own held-out fold, which it did not train on
    held_out = scored[:-1]
    assert all("held_out" in s for s in held_out)
    folds = sorted({Path(s).parent.name for s in held_out})
    assert folds == ["fold-0", "fold-1", "fold-2"]
    for i in range(3):
        train = {json.loads(l)["provenance"]["line"] for l in (tmp_path / "tune" / "data" / f"fold-{i}" / "train.jsonl").open()}
        held = {json.loads(l)["provenance"]["line"] for l in (tmp_path / "tune" / "data" / f"fold-{i}" / "held_out.jsonl").open()}
        assert train.isdisjoint(held) and len(train | held) == 48
    # trial 0 is suggest's config; the winner is the best mean over folds; its settings are in best.yaml
    assert result.trials[0].params == result.baseline.params
    complete = [t for t in result.trials if t.state == "complete"]
    assert result.best.mean == max(t.mean for t in complete)
    best = load_config(tmp_path / "tune" / "best.yaml")
    assert best.train.lr == pytest.approx(result.best.params["lr"])
    assert best.train.epochs == result.best.params["epochs"]
    assert best.data.val_ratio == 0.0 and best.data.train == str(data.resolve())
    assert result.test["metrics"]["accuracy"] > 0
    text = (tmp_path / "tune" / "tune.md").read_text(encoding="utf-8")
    assert "| rank | trial |" in text and "(suggest)" in text
    lines = [json.loads(l) for l in (tmp_path / "tune" / "trials.jsonl").open()]
    assert len(lines) == len(result.trials) == 4
    assert (tmp_path / "tune" / "history.png").stat().st_size > 1000


def test_budget_is_respected_on_a_mocked_clock(tmp_path, tiny_model, data):
    clock = Clock()
    runs = FakeRuns(clock, seconds=100.0)
    # 3 folds of 100 s a trial and a final training of about 100 s: a 20-minute budget fits 3 trials, not 4
    result = tune(data, tiny_model, budget="20m", kfold=3, out=tmp_path / "tune", measure=False, progress=False,
                  clock=clock, execute=runs)
    used = clock.now - 1000.0
    assert used <= 20 * 60
    assert "budget" in result.stopped
    assert len(runs.fold_calls) >= 6  # it did use the budget
    assert result.final_dir is not None and runs.calls[-1][0] is None  # final training, no test file


def test_proposals_too_long_for_the_budget_left_are_set_aside_not_cut(tmp_path, tiny_model, data, monkeypatch):
    """Runs cost time per epoch: a proposal whose folds and final training cannot finish in what is left is never
    started (another is asked for), so no trial is stopped half-way by the budget and the search goes on after."""
    import optuna

    from fewtune.advice import suggest as suggest_module

    # the search starts where this scenario was built (suggest's lr 2e-4 at batch 1 for this tiny set, before the
    # small-model reference rose): from there TPE keeps proposing after the long ones are set aside
    monkeypatch.setattr(suggest_module, "SMALL_MODEL_LORA", (2e-4, (1e-4, 2e-4)))
    clock = Clock()
    runs = FakeRuns(clock, seconds=10.0, per_epoch=True)
    result = tune(data, tiny_model, budget="12m", kfold=3, out=tmp_path / "tune", measure=False, progress=False,
                  clock=clock, execute=runs)
    assert clock.now - 1000.0 <= 12 * 60
    assert all(t.note != tune_module.BUDGET_NOTE for t in result.trials)  # nothing started was cut
    assert all(len(t.fold_values) == 3 for t in result.trials if t.state == "complete")
    study = optuna.load_study(study_name=tune_module.STUDY, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "tune" / "study.journal"))))
    aside = [t.number for t in study.trials if t.user_attrs.get("set_aside")]
    ran = [t.number for t in result.trials]
    assert aside and any(n > min(aside) for n in ran)  # something was set aside, and a later proposal ran
    assert not set(aside) & set(ran)
    epochs_run = [c[1]["epochs"] for c in runs.fold_calls]
    assert all(study.trials[n].params["epochs"] > min(epochs_run) for n in aside)  # the long ones were set aside


def test_time_model_weighs_each_batch_size_by_its_measured_speed():
    times = tune_module.TimeModel(per_token=0.01, throughput={1: 100.0, 4: 250.0, 8: 400.0})
    assert times.weight(8) == 1.0
    assert times.weight(4) == pytest.approx(1.6)
    assert times.weight(1) == pytest.approx(4.0)
    assert times.weight(16) == 1.0  # beyond the measured sizes: the nearest one's speed
    assert tune_module.TimeModel(per_token=0.01).weight(4) == 1.0  # nothing measured: tokens are tokens
    # per_token at the fastest batch: 1,000 tokens at batch 4 take 1000 / 250 s (plus the fixed cost)
    at_fastest = tune_module.TimeModel(per_token=1 / 400.0, fixed=0.0, throughput={1: 100.0, 4: 250.0, 8: 400.0})
    assert at_fastest.estimate(1000 * at_fastest.weight(4)) == pytest.approx(1000 / 250.0)


def test_an_interrupted_tune_continues_and_reuses_finished_folds(tmp_path, tiny_model, data):
    clock = Clock()
    first = FakeRuns(clock, fail_at=4)  # Ctrl-C during trial 1's second fold
    with pytest.raises(TuneInterrupted, match="run the same command"):
        tune(data, tiny_model, trials=3, kfold=3, out=tmp_path / "tune", measure=False, progress=False, clock=clock,
             execute=first)
    done = list(first.calls)
    assert len(done) == 4
    again = FakeRuns(clock)
    result = tune(data, tiny_model, trials=3, kfold=3, out=tmp_path / "tune", measure=False, progress=False,
                  clock=clock, execute=again)
    # the four finished fold runs are not trained again: trial 1 goes on from its second fold
    assert not any(call in again.calls for call in done)
    finished = [t for t in result.trials if t.state in ("complete", "pruned")]
    assert len(finished) == 3
    interrupted = done[3][1]  # the settings of the trial Ctrl-C stopped, which had one fold done
    assert "fold-1" in again.calls[0][0] and again.calls[0][1] == interrupted
    assert any(t.params["lr"] == pytest.approx(interrupted["lr"]) and len(t.fold_values) >= 2 for t in finished)
    # a finished tune run again trains nothing: its folds and its final model are on record
    once_more = FakeRuns(clock)
    same = tune(data, tiny_model, trials=3, kfold=3, out=tmp_path / "tune", measure=False, progress=False,
                clock=clock, execute=once_more)
    assert once_more.calls == [] and same.best.params == result.best.params


def test_dev_selection_trains_on_all_the_data_and_scores_on_the_dev_file(tmp_path, tiny_model, data):
    dev = classification(tmp_path / "dev.jsonl", 16)
    clock = Clock()
    runs = FakeRuns(clock)
    seen = []
    result = tune(data, tiny_model, trials=3, dev=dev, out=tmp_path / "tune", measure=False, progress=False,
                  clock=clock, execute=lambda cfg, *a: seen.append(cfg) or runs(cfg, *a), final=False)
    assert "dev file" in result.selection
    assert {c.data.train for c in seen} == {str(data.resolve())} and {c.data.format for c in seen} == {"auto"}
    assert all(c.data.validation is None and c.data.val_ratio == 0.0 for c in seen)
    assert {call[0] for call in runs.calls} == {str(dev)}
    assert all(len(t.fold_values) == 1 for t in result.trials)


def test_seed_reaches_every_run_the_final_one_and_best_yaml(tmp_path, tiny_model, data):
    """--seed seeds the folds, the sampler and the runs: two seeds that pick the same settings must not train
    the same final model (suggest's default train.seed is 42; 7 must reach the final run and best.yaml)."""
    clock = Clock()
    runs = FakeRuns(clock)
    seen = []
    result = tune(data, tiny_model, trials=2, kfold=2, seed=7, out=tmp_path / "tune", measure=False, progress=False,
                  clock=clock, execute=lambda cfg, *a: seen.append(cfg) or runs(cfg, *a))
    assert result.final_dir is not None and seen[-1].train.output_dir == str(result.final_dir)
    assert len(seen) >= 3 and {c.train.seed for c in seen} == {7}  # trial 0's two folds, the final run
    assert load_config(tmp_path / "tune" / "best.yaml").train.seed == 7


def test_a_tune_of_other_data_in_the_same_folder_is_refused(tmp_path, tiny_model, data):
    clock = Clock()
    tune(data, tiny_model, trials=1, kfold=2, out=tmp_path / "tune", measure=False, progress=False, clock=clock,
         execute=FakeRuns(clock), final=False)
    other = classification(tmp_path / "other.jsonl", 40)
    with pytest.raises(ConfigError, match="another --out|other data"):
        tune(other, tiny_model, trials=1, kfold=2, out=tmp_path / "tune", measure=False, progress=False, clock=clock,
             execute=FakeRuns(clock), final=False)


def test_tune_command_needs_a_limit(tmp_path, data):
    from typer.testing import CliRunner

    from fewtune.cli import app

    result = CliRunner().invoke(app, ["tune", str(data), "--no-measure"])
    assert result.exit_code == 2
    assert "--trials N or --budget" in result.output


@pytest.mark.slow
def test_real_tune_on_a_tiny_model(tmp_path, tiny_model, data):
    """Two trials on 2 folds, real training and choice scoring, then the final model on the test file."""
    test_file = classification(tmp_path / "test.jsonl", 12)
    result = tune(data, tiny_model, trials=2, kfold=2, test=test_file, out=tmp_path / "tune", measure=False,
                  progress=False, search=("lr", "epochs"))
    assert len(result.trials) == 2 and all(len(t.fold_values) >= 1 for t in result.trials)
    assert all(0.0 <= v <= 1.0 for t in result.trials for v in t.fold_values)
    assert (result.final_dir / "adapter_config.json").exists() or (result.final_dir / "adapter").exists()
    assert 0.0 <= result.test["metrics"]["accuracy"] <= 1.0
    best = yaml.safe_load((tmp_path / "tune" / "best.yaml").read_text(encoding="utf-8"))
    assert best["train"]["lr"] == pytest.approx(result.best.params["lr"])


def _embedded_gguf() -> str:
    from fewtune.models import DEFAULT_MODEL, EMBEDDED, _package_dir

    entry = EMBEDDED[DEFAULT_MODEL]
    return str(entry.locate(_package_dir(entry.package)))


@pytest.mark.parametrize("model", ["gguf", "gemma3-270m"])
def test_tune_takes_a_gguf_file_and_the_other_embedded_model(tmp_path, data, model):
    """suggest and the search run unchanged on a user's .gguf file and on gemma3-270m (training stood in for)."""
    from fewtune.models import ModelNotFoundError, resolve_model_path

    if model == "gguf":
        model = _embedded_gguf()
    else:
        try:
            resolve_model_path(model)
        except ModelNotFoundError:
            pytest.skip("gemma3-270m is not installed (make setup-gemma)")
    clock = Clock()
    runs = FakeRuns(clock)
    seen = []
    result = tune(data, model, trials=2, kfold=2, out=tmp_path / "tune", measure=False, progress=False, clock=clock,
                  execute=lambda cfg, *a: seen.append(cfg.model.name) or runs(cfg, *a), final=False)
    assert len(result.trials) == 2 and seen and set(seen) == {model}
    assert load_config(tmp_path / "tune" / "best.yaml").model.name == model
