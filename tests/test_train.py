import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewtune.data.formats import DataError
from fewtune.train.loop import Interrupted, Trainer, TrainingError, train
from fewtune.train.loss import WeightedLMLoss
from tests.conftest import write_jsonl
from tests.precision import PRECISIONS, assert_gradients_match, capture_gradients, loss_rtol


def metrics(run_dir) -> list[dict]:
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_run_directory_contents(make_config):
    cfg = make_config()
    result = train(cfg)
    run = Path(result.run_dir)
    for name in ("config.yaml", "template.json", "metrics.jsonl", "loss.png", "summary.json",
                 "adapter/adapter_config.json", "tokenizer/tokenizer_config.json", "checkpoints/latest"):
        assert (run / name).exists(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_examples"] == 32 and summary["val_examples"] == 8
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert any("val_loss" in m for m in metrics(run)) and result.steps == 8


@PRECISIONS
def test_gradient_accumulation_equals_one_big_batch(make_config, tmp_path, precision):
    """4 micro-batches of 1 accumulate to the gradient of one batch of 4 (tolerances: tests/precision.py)."""
    # (length grouping forms batches per batch size, so it is off to compare equal sets of examples)
    settings = dict(train__max_steps=2, train__group_by_length=False, train__mixed_precision=precision)
    big = Trainer(make_config(train__batch_size=4, train__grad_accum=1, train__output_dir=str(tmp_path / "a"), **settings))
    small = Trainer(make_config(train__batch_size=1, train__grad_accum=4, train__output_dir=str(tmp_path / "b"), **settings))
    assert big.accelerator.mixed_precision == small.accelerator.mixed_precision == precision
    lens = [len(big.train_set.items[i]) for i in range(4)]
    assert len(set(lens)) > 1  # examples of different lengths: per-micro-batch averaging would differ
    grads_big, grads_small = capture_gradients(big), capture_gradients(small)
    big.fit()
    small.fit()
    loss_big = [m["train_loss"] for m in metrics(tmp_path / "a") if "train_loss" in m]
    loss_small = [m["train_loss"] for m in metrics(tmp_path / "b") if "train_loss" in m]
    assert len(loss_big) == 2 and loss_big == pytest.approx(loss_small, rel=loss_rtol(precision))
    assert_gradients_match(grads_big[0], grads_small[0], precision)  # the first step: the same weights
    if precision == "no":  # (bf16: tests/precision.py says why weights after Adam are not compared)
        wa, wb = trainable(big), trainable(small)
        for name in wa:
            torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6)


def test_all_masked_example_fails_with_file_and_line(make_config, tmp_path):
    rows = [{"prompt": "short", "completion": "fine"}] * 5
    rows.insert(2, {"prompt": "很长的提示" * 40, "completion": "never seen"})
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(DataError) as info:
        Trainer(make_config(data__train=str(path), data__val_ratio=0))
    assert f"{path}:3" in str(info.value) and "cut away entirely by max_length=64" in str(info.value)
    dropped = Trainer(make_config(data__train=str(path), data__val_ratio=0, data__on_bad_example="drop"))
    assert len(dropped.train_set.dropped) == 1 and len(dropped.train_set.items) == 5


def test_resume_reaches_the_same_result(make_config, tmp_path):
    settings = dict(train__max_steps=9, train__batch_size=2, method__lora__dropout=0.1, eval__every=4)
    straight = train(make_config(train__output_dir=str(tmp_path / "straight"), **settings))
    cfg = make_config(train__output_dir=str(tmp_path / "resumed"), **settings)
    with pytest.raises(Interrupted) as info:
        train(cfg, stop_after=4)  # the same path Ctrl-C takes: checkpoint, then stop
    assert info.value.step == 4
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text() == "step-0000004"
    resumed = train(cfg, resume=True)
    assert resumed.steps == straight.steps == 9
    a = [m["train_loss"] for m in metrics(tmp_path / "straight") if "train_loss" in m]
    b = [m["train_loss"] for m in metrics(tmp_path / "resumed") if "train_loss" in m]
    assert len(b) == 9 and a == pytest.approx(b, rel=1e-6)
    wa = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name])


def test_early_stopping_on_rising_validation_loss(make_config, tmp_path):
    # validation asks for the opposite answers: the better training goes, the worse validation gets
    train_rows = [{"prompt": f"问题 {i}", "completion": "是"} for i in range(24)]
    val_rows = [{"prompt": f"问题 {i}", "completion": "不是"} for i in range(8)]
    cfg = make_config(data__train=str(write_jsonl(tmp_path / "t.jsonl", train_rows)),
                      data__validation=str(write_jsonl(tmp_path / "v.jsonl", val_rows)),
                      train__epochs=5, train__lr=1e-2, eval__every=1, eval__early_stopping__patience=2)
    result = train(cfg)
    assert result.stopped_early and result.steps < 30
    vals = [m["val_loss"] for m in metrics(result.run_dir) if "val_loss" in m]
    assert vals[-1] > min(vals) and result.best_val_loss == min(vals)
    assert len(vals) - 1 - vals.index(min(vals)) == 2  # stopped after `patience` evaluations without improvement


def test_eval_every_counts_from_the_last_evaluation(make_config, tmp_path):
    # 7 steps per epoch, eval_every 4: the old schedule (step % 4) evaluated at 4, 7 (epoch end) and again at 8,
    # one step later, which cost a unit of early-stopping patience for nearly the same weights
    rows = [{"prompt": f"问题 {i}", "completion": "是"} for i in range(7)]
    cfg = make_config(data__train=str(write_jsonl(tmp_path / "t.jsonl", rows)),
                      data__validation=str(write_jsonl(tmp_path / "v.jsonl", rows[:2])),
                      train__epochs=2, train__batch_size=1, eval__every=4)
    result = train(cfg)
    assert [m["step"] for m in metrics(result.run_dir) if "val_loss" in m] == [4, 7, 11, 14]


def test_metric_ties_are_broken_by_the_validation_loss(make_config, monkeypatch):
    # accuracy on a small validation set ties often: the tie with the lower loss is the better checkpoint
    accuracy, losses = iter([0.5, 0.8, 0.8, 0.8, 0.6]), iter([1.0, 0.9, 0.7, 0.8, 0.5])
    monkeypatch.setattr(Trainer, "_task_metrics", lambda self: {"accuracy": next(accuracy)})
    monkeypatch.setattr(Trainer, "validation_loss", lambda self: next(losses))
    cfg = make_config(train__max_steps=5, train__batch_size=1, eval__every=1, eval__task="classification",
                      eval__metric="accuracy", eval__early_stopping__patience=5)
    result = train(cfg)
    best = [m["step"] for m in metrics(result.run_dir) if m.get("best")]
    assert best == [1, 2, 3]  # step 4 ties with a higher loss; step 5 has the lowest loss but a lower accuracy
    assert json.loads((Path(result.run_dir) / "summary.json").read_text())["best_step"] == 3


def test_resume_from_a_checkpoint_without_last_eval_step(make_config, tmp_path):
    # checkpoints written before the loop kept last_eval_step: the resumed run evaluates on the usual schedule
    settings = dict(train__max_steps=9, train__batch_size=2, eval__every=3)
    straight = train(make_config(train__output_dir=str(tmp_path / "straight"), **settings))
    cfg = make_config(train__output_dir=str(tmp_path / "resumed"), **settings)
    with pytest.raises(Interrupted):
        train(cfg, stop_after=4)
    folder = tmp_path / "resumed" / "checkpoints" / "step-0000004"
    loop = json.loads((folder / "loop.json").read_text())
    del loop["last_eval_step"]
    del loop["inputs"]  # nor recorded its inputs or checksums
    (folder / "loop.json").write_text(json.dumps(loop))
    (folder / "manifest.json").unlink()
    train(cfg, resume=True)
    steps = lambda run: [m["step"] for m in metrics(run) if "val_loss" in m]  # noqa: E731
    assert steps(tmp_path / "resumed") == steps(straight.run_dir) == [3, 6, 9]


def _recorded_before_the_keys_moved(inputs: dict) -> dict:
    """A checkpoint's inputs as fewtune recorded them before the eval keys moved out of train, and replay and
    curriculum out of regularise."""
    from fewtune.config import MOVED_KEYS

    old_name = {new: old for old, new in MOVED_KEYS.items()}

    def then(keys: dict) -> dict:
        out = {}
        for key, value in keys.items():
            moved = next((new for new in old_name if key == new or key.startswith(new + ".")), None)
            if moved:
                out[old_name[moved] + key[len(moved):]] = value
            elif not key.startswith("eval."):  # the eval section's other keys are new
                out[key] = value
        return out

    return {**inputs, "config": then(inputs["config"]), "files": then(inputs["files"])}


def test_a_run_from_before_the_keys_moved_resumes(make_config, tmp_path, monkeypatch):
    """Its checkpoint records train.eval_every ... and regularise.replay.general's file, its config.yaml has
    them: the moved keys are not a change."""
    import yaml

    from fewtune.config import load_config
    from fewtune.train import fingerprint

    recorded_now = fingerprint.run_inputs
    monkeypatch.setattr(fingerprint, "run_inputs", lambda *a: _recorded_before_the_keys_moved(recorded_now(*a)))
    run = tmp_path / "run"
    general = write_jsonl(tmp_path / "general.jsonl", [{"prompt": f"天气 {i}", "completion": "晴"} for i in range(10)])
    cfg = make_config(train__max_steps=6, eval__every=2, eval__early_stopping__patience=4, train__output_dir=str(run),
                      data__replay__general=str(general), data__replay__ratio=0.25, data__curriculum__order="length")
    with pytest.raises(Interrupted):
        train(cfg, stop_after=3)
    from fewtune.train import checkpoint as ckpt

    recorded = ckpt.read_loop_state(run / "checkpoints" / "step-0000003")["inputs"]
    assert "regularise.replay.general" in recorded["files"] and recorded["config"]["train.eval_every"] == 2
    monkeypatch.setattr(fingerprint, "run_inputs", recorded_now)
    then = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    ev = then.pop("eval")
    then["train"].update({f"eval_{k}": ev[k] for k in ("every", "task", "mode", "metric", "sample")},
                         early_stopping=ev["early_stopping"])
    then["regularise"].update(replay=then["data"].pop("replay"), curriculum=then["data"].pop("curriculum"))
    (run / "config.yaml").write_text(yaml.safe_dump(then), encoding="utf-8")
    as_resumed = [f"train.output_dir={run}", "train.resume=true"]  # what `fewtune train --resume RUN` adds
    changed = load_config(run / "config.yaml", as_resumed + ["eval.every=3"])
    with pytest.raises(TrainingError, match="eval.every: 2 -> 3") as info:
        train(changed)  # a real change is still refused
    assert "train.eval_every" not in str(info.value)
    resumed = load_config(run / "config.yaml", as_resumed)
    assert resumed.eval == cfg.eval and resumed.data == cfg.data
    assert train(resumed).steps == 6


def test_length_grouped_batches_cover_the_epoch_once():
    from fewtune.train.loop import epoch_batches

    lengths = [5, 90, 7, 88, 6, 91, 8, 89] * 8
    plain = epoch_batches(lengths, 4, 1, 0, seed=1, epoch=0)
    grouped = epoch_batches(lengths, 4, 1, 0, seed=1, epoch=0, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(64)) == sorted(i for b in plain for i in b)
    padded = lambda batches: sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded(grouped) < 0.7 * padded(plain)
    assert grouped == epoch_batches(lengths, 4, 1, 0, seed=1, epoch=0, group_by_length=True)
    assert grouped != epoch_batches(lengths, 4, 1, 0, seed=1, epoch=1, group_by_length=True)
    # two processes split each global batch between them
    r0 = epoch_batches(lengths, 2, 2, 0, seed=1, epoch=0, group_by_length=True)
    r1 = epoch_batches(lengths, 2, 2, 1, seed=1, epoch=0, group_by_length=True)
    assert sorted(i for b in r0 + r1 for i in b) == list(range(64))


def test_selective_logits_equal_full_logits(tiny_models, tokenizer):
    from transformers import AutoModelForCausalLM

    for path in tiny_models.values():
        model = AutoModelForCausalLM.from_pretrained(path)
        ids = torch.randint(0, 1000, (3, 12))
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        weights = torch.zeros(3, 12)
        weights[:, 6:] = 1.0
        weights[1, 9:] = 0
        weights[2, 7] = 0.5
        fast = WeightedLMLoss(model, selective=True)
        full = WeightedLMLoss(model, selective=False)
        assert fast.selective
        torch.testing.assert_close(fast(ids, mask, weights), full(ids, mask, weights))


def test_full_fine_tuning_with_freezing(make_config):
    top = Trainer(make_config(method__name="full", method__full__train_top_layers=1, method__full__freeze_embeddings=True))
    names = [n for n, p in top.model.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n or n.endswith("norm.weight") for n in names)
    assert not any("embed_tokens" in n for n in names)
    everything = Trainer(make_config(method__name="full"))
    assert everything.trainable == everything.total > top.trainable
    result = train(make_config(method__name="full", method__full__train_top_layers=1, train__max_steps=2))
    assert (Path(result.run_dir) / "model" / "config.json").exists()


def _lora_b(trainer) -> list[torch.nn.Parameter]:
    return [p for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_B" in n]


@PRECISIONS
@pytest.mark.parametrize("fault", ["nan weight", "overflow"])
def test_non_finite_loss_stops_with_a_clear_message(make_config, precision, fault):
    """A NaN in the weights, or activations that overflow (to inf in float32 and in bf16 alike: both have an
    8-bit exponent), make the loss non-finite; the run stops at that step, under either precision."""
    trainer = Trainer(make_config(train__max_steps=2, train__mixed_precision=precision))
    assert trainer.accelerator.mixed_precision == precision
    with torch.no_grad():
        if fault == "nan weight":
            _lora_b(trainer)[0][0, 0] = float("nan")
        else:
            for p in _lora_b(trainer):
                p.fill_(1e30)
    with pytest.raises(TrainingError, match=r"the loss became (nan|inf|-inf) at step 1: training diverged"):
        trainer.fit()
    assert not (trainer.run_dir / "checkpoints").exists()  # nothing poisoned was saved


@PRECISIONS
def test_non_finite_gradient_under_a_finite_loss_stops_before_the_update(make_config, precision):
    """An overflow in the backward pass only (simulated on one gradient) stops the run before the optimizer
    writes it into the weights."""
    trainer = Trainer(make_config(train__max_steps=2, train__mixed_precision=precision,
                                  train__max_grad_norm="null"))  # the norm is checked without clipping too
    target = _lora_b(trainer)[0]
    target.register_hook(lambda grad: grad * float("inf"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    with pytest.raises(TrainingError, match=r"gradient norm became (nan|inf) at step 1 \(mixed precision: "
                                            + precision):
        trainer.fit()
    after = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    for name, value in before.items():
        assert torch.equal(value, after[name]), name  # no weight was updated


def test_qwen2_family_trains(make_config, tiny_models):
    result = train(make_config(model__name=tiny_models["qwen2"], train__max_steps=2))
    assert result.steps == 2 and (Path(result.run_dir) / "adapter").is_dir()


def test_ctrl_c_checkpoints_and_resume_finishes(make_config, tmp_path):
    """A real SIGINT to `fewtune train`: exit 130 with a checkpoint, then --resume goes on from it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from fewtune.config import save_config

    run = tmp_path / "sigint"
    endless = dict(train__batch_size=2, train__output_dir=str(run), eval__early_stopping__enabled=False)
    save_config(make_config(train__max_steps=100000, **endless), tmp_path / "c.yaml")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "fewtune.cli", "train", str(tmp_path / "c.yaml")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # wait until training is under way
        if (run / "metrics.jsonl").exists() and sum(1 for _ in open(run / "metrics.jsonl")) > 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, output
    assert "fewtune train --resume" in output
    step = int((run / "checkpoints" / "latest").read_text().split("-")[1])
    assert step >= 2
    done = train(make_config(train__max_steps=step + 5, **endless), resume=True)
    assert done.steps == step + 5
    steps = [m["step"] for m in metrics(run) if "train_loss" in m]
    assert steps == list(range(1, step + 6))  # every step logged once: none lost, none repeated


def test_crash_while_writing_a_checkpoint_keeps_the_last_good_one(make_config, tmp_path, monkeypatch):
    from fewtune.train import checkpoint as ckpt

    cfg = make_config(train__max_steps=4, train__save_every=2, train__output_dir=str(tmp_path / "crash"))
    trainer = Trainer(cfg)
    real_torch_save = torch.save

    def failing_save(obj, path, *a, **k):
        if "step-0000004" in str(path) and Path(path).name == "optimizer.bin":  # the second checkpoint dies
            Path(path).write_bytes(b"partial")  # half-written, by accelerate's save_state
            raise OSError("disk full")
        return real_torch_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit()
    monkeypatch.setattr(torch, "save", real_torch_save)
    assert (tmp_path / "crash" / "checkpoints" / "latest").read_text() == "step-0000002"
    latest = ckpt.newest_intact_checkpoint(tmp_path / "crash")
    assert latest is not None and latest.name == "step-0000002"
    assert ckpt.read_loop_state(latest)["step"] == 2 and ckpt.load_weights(latest)
    assert not list((tmp_path / "crash" / "checkpoints").glob("*.tmp-*"))  # the half-written one is gone
    assert train(cfg, resume=True).steps == 4


def test_a_checkpoint_holds_accelerates_state_and_only_the_trainable_weights(make_config, tmp_path):
    """accelerate's save_state writes the optimizer, the schedule and the random states; the weights in it are
    the trainable ones (LoRA's), never a full-model file with the frozen base."""
    from fewtune.train import checkpoint as ckpt

    cfg = make_config(train__max_steps=2, train__output_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg)
    trainer.fit()
    folder = tmp_path / "run" / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in folder.iterdir()) == sorted(ckpt.FILES + (ckpt.MANIFEST,))
    assert sorted(json.loads((folder / ckpt.MANIFEST).read_text())) == sorted(ckpt.FILES)
    assert not list(folder.glob("model*.safetensors")) and not list(folder.glob("pytorch_model*"))
    saved = load_file(folder / "trainable.safetensors")
    assert sorted(saved) == sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert all("lora_" in name for name in saved)  # no frozen base weight among them
    rng = torch.load(folder / "random_states_0.pkl", weights_only=False)
    assert {"random_state", "numpy_random_seed", "torch_manual_seed"} <= rng.keys()
    schedule = torch.load(folder / "custom_checkpoint_0.pkl", weights_only=False)
    assert schedule["last_epoch"] == 2 == trainer.scheduler.state_dict()["last_epoch"]


def _to_the_format_before_accelerate(folder: Path) -> None:
    """Rewrite a checkpoint as fewtune wrote it before accelerate's save_state: one state.pt with the optimizer,
    the schedule and the main process's random states under "rng"."""
    from fewtune.train import checkpoint as ckpt

    rng = torch.load(folder / "random_states_0.pkl", weights_only=False)
    state = {"optimizer": torch.load(folder / "optimizer.bin", weights_only=False),
             "scheduler": torch.load(folder / "custom_checkpoint_0.pkl", weights_only=False),
             "rng": {"python": rng["random_state"], "numpy": rng["numpy_random_seed"],
                     "torch": rng["torch_manual_seed"]}}
    for name in ("optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl", ckpt.MANIFEST):
        (folder / name).unlink()
    torch.save(state, folder / "state.pt")
    ckpt._write_manifest(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(ckpt.LEGACY_FILES + (ckpt.MANIFEST,))


def test_a_checkpoint_in_the_format_before_accelerate_resumes_to_the_same_result(make_config, tmp_path):
    settings = dict(train__max_steps=6, train__batch_size=2, method__lora__dropout=0.1, eval__every=3)
    straight = train(make_config(train__output_dir=str(tmp_path / "straight"), **settings))
    cfg = make_config(train__output_dir=str(tmp_path / "old"), **settings)
    with pytest.raises(Interrupted):
        train(cfg, stop_after=4)
    _to_the_format_before_accelerate(tmp_path / "old" / "checkpoints" / "step-0000004")
    assert train(cfg, resume=True).steps == 6
    a = [m["train_loss"] for m in metrics(straight.run_dir) if "train_loss" in m]
    b = [m["train_loss"] for m in metrics(tmp_path / "old") if "train_loss" in m]
    assert len(b) == 6 and b == pytest.approx(a, rel=1e-6)  # dropout too: the random states came back
    wa = load_file(straight.run_dir / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "old" / "adapter" / "adapter_model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name])


def test_validation_split_is_stratified_and_seeded(tmp_path, make_config):
    from fewtune.data.dataset import split_examples
    from fewtune.data.formats import load_examples

    rows = [{"text": f"t{i}", "label": "a" if i < 40 else "b"} for i in range(50)]
    examples = load_examples(write_jsonl(tmp_path / "cls.jsonl", rows))
    train_part, val = split_examples(examples, 0.2, seed=7)
    assert sorted(e.label for e in val) == ["a"] * 8 + ["b"] * 2
    assert len(train_part) == 40
    again = split_examples(examples, 0.2, seed=7)[1]
    assert [e.line for e in again] == [e.line for e in val]
    assert [e.line for e in split_examples(examples, 0.2, seed=8)[1]] != [e.line for e in val]


def test_each_epoch_has_its_own_order_and_a_resume_across_epochs_matches(make_config, tmp_path):
    """Epoch 2 follows epoch_batches(epoch=1), not epoch 1's order again; so a run resumed in epoch 2 (which
    computes that order afresh) ends where the uninterrupted run does."""
    from fewtune.train.loop import epoch_batches

    settings = dict(train__epochs=2, train__batch_size=4, train__group_by_length=False,
                    eval__early_stopping__enabled=False, method__lora__dropout=0.1)
    straight = train(make_config(train__output_dir=str(tmp_path / "straight"), **settings))
    trainer = Trainer(make_config(train__output_dir=str(tmp_path / "probe"), **settings))
    per_epoch = trainer.batches_per_epoch
    assert straight.steps == 2 * per_epoch
    expected = [sum(trainer.lengths[i] for i in batch) for epoch in (0, 1)
                for batch in epoch_batches(trainer.lengths, 4, 1, 0, seed=3, epoch=epoch)]
    assert [m["tokens"] for m in metrics(straight.run_dir) if "train_loss" in m] == expected
    cfg = make_config(train__output_dir=str(tmp_path / "resumed"), **settings)
    with pytest.raises(Interrupted):
        train(cfg, stop_after=per_epoch + 2)  # two steps into the second epoch
    train(cfg, resume=True)
    a = [m["train_loss"] for m in metrics(straight.run_dir) if "train_loss" in m]
    b = [m["train_loss"] for m in metrics(tmp_path / "resumed") if "train_loss" in m]
    assert b == pytest.approx(a, rel=1e-6)
