"""What eval, compare, generate, chat and pseudo-label compute in (fewtune.inference_precision): a run's training
precision, another model's by timed forward passes (mocked here), bf16 as weights cast once; exports stay fp32."""

import json

import pytest
import torch

from fewtune import inference_precision as ip
from fewtune import precision as machine_precision
from fewtune.config import EvalSection
from fewtune.data.formats import Message
from fewtune.eval.compare import shared_precision
from fewtune.eval.evaluate import evaluate
from fewtune.eval.scoring import choice_scores
from fewtune.generate import load_for_inference
from fewtune.train import runtime
from fewtune.train.loop import train

from tests.conftest import write_jsonl

LABELS = ["positive", "negative", "neutral", "很好"]


def _dtype(loaded) -> torch.dtype:
    return next(loaded.model.parameters()).dtype


def _say_trained_in(run, precision: str) -> None:
    """Rewrite the run's start record as if its training had run in ``precision``."""
    path = run / "metrics.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    for record in lines:
        if record.get("event") == "start":
            record["mixed_precision"] = precision
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


@pytest.fixture
def trained_run(make_config, tmp_path):
    """A finished tiny LoRA run (trained in fp32: the suite pins auto)."""
    train(make_config(train__max_steps=2, train__output_dir=str(tmp_path / "run"), train__mixed_precision="no"))
    return tmp_path / "run"


@pytest.fixture
def unforced(monkeypatch):
    monkeypatch.delenv(runtime.PRECISION_ENV, raising=False)


def test_trained_precision_is_the_last_start_record(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert ip.trained_precision(run) is None  # no metrics.jsonl
    (run / "metrics.jsonl").write_text(
        '{"step": 0, "event": "start", "mixed_precision": "no"}\n{"step": 1, "train_loss": 1.0}\n'
        'not json "start"\n{"step": 1, "event": "start", "mixed_precision": "bf16"}\n')
    assert ip.trained_precision(run) == "bf16"  # a resumed session's record wins


def test_a_run_runs_in_the_precision_it_trained_in(trained_run, unforced, monkeypatch):
    monkeypatch.setattr(machine_precision, "cpu_bf16_speedup", lambda: 2.0)  # a CPU with fast bf16
    fp32 = load_for_inference(str(trained_run), merge=True)
    assert (fp32.precision, _dtype(fp32)) == ("no", torch.float32) and fp32.precision_reason == "the run trained in fp32"
    _say_trained_in(trained_run, "bf16")
    bf16 = load_for_inference(str(trained_run), merge=True)
    assert (bf16.precision, _dtype(bf16)) == ("bf16", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())  # cast once, nothing left in fp32
    # on a CPU where bf16 is far slower (AVX2 only), a bf16 run is evaluated in fp32, and the reason says so
    monkeypatch.setattr(machine_precision, "cpu_bf16_speedup", lambda: 0.2)
    slow = load_for_inference(str(trained_run), merge=True)
    assert (slow.precision, _dtype(slow)) == ("no", torch.float32) and "0.20x the fp32 speed" in slow.precision_reason
    # the environment variable and an explicit setting both win over the run's record
    monkeypatch.setenv(runtime.PRECISION_ENV, "bf16")
    assert load_for_inference(str(trained_run)).precision == "bf16"
    assert _dtype(load_for_inference(str(trained_run), precision="no")) == torch.float32


def test_another_model_is_timed_once_and_the_faster_precision_kept(tiny_model, unforced, monkeypatch, tmp_path):
    monkeypatch.setattr("fewtune.precision._cache_path", lambda: tmp_path / "precision.json")
    monkeypatch.setattr(machine_precision, "cpu_bf16_speedup", lambda: 2.0)
    calls = []

    def timed(model, precision):
        calls.append((precision, next(model.parameters()).dtype))
        return {"no": 1.0, "bf16": 0.5}[precision]

    monkeypatch.setattr(ip, "_time_forward", timed)
    first = load_for_inference(tiny_model)
    assert calls == [("no", torch.float32), ("bf16", torch.bfloat16)]  # the bf16 copy is timed, then kept
    assert (first.precision, _dtype(first)) == ("bf16", torch.bfloat16)
    assert "forward pass" in first.precision_reason and "2.00x" in first.precision_reason
    again = load_for_inference(tiny_model)
    assert len(calls) == 2 and again.precision == "bf16" and "measured earlier" in again.precision_reason
    # slower in bf16 (another model, so another cache entry): fp32, the fp32 weights untouched
    other = tmp_path / "copy"
    load_for_inference(tiny_model, precision="no").model.save_pretrained(other)
    load_for_inference(tiny_model, precision="no").tokenizer.save_pretrained(other)
    monkeypatch.setattr(ip, "_time_forward", lambda model, precision: {"no": 1.0, "bf16": 0.95}[precision])
    slow = load_for_inference(str(other))
    assert (slow.precision, _dtype(slow)) == ("no", torch.float32)


def test_explicit_settings_and_loaded_dtypes(tiny_model, unforced):
    assert _dtype(load_for_inference(tiny_model, precision="bf16")) == torch.bfloat16
    assert _dtype(load_for_inference(tiny_model, precision="no")) == torch.float32
    kept = load_for_inference(tiny_model, dtype="bfloat16", precision="no")  # model.dtype is not overridden
    assert _dtype(kept) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 inference needs a GPU"):
        load_for_inference(tiny_model, precision="fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        load_for_inference(tiny_model, precision="half")
    assert EvalSection(precision=False).precision == "no"  # YAML's reading of a bare `no`


def test_evaluation_in_bf16_picks_the_labels_fp32_picks(tiny_model, tmp_path):
    """Scores move by bf16 rounding only, so every example whose fp32 winner leads by more than twice that
    keeps its label; eval records the precision it ran in."""
    conversations = [[Message("user", f"review {i}: the food was {w} and the room {r}")]
                     for i, (w, r) in enumerate([(w, r) for w in ("great", "awful", "okay", "好吃", "一般")
                                                  for r in ("clean", "dirty", "安静")])]
    scores = {}
    for precision in ("no", "bf16"):
        loaded = load_for_inference(tiny_model, system_prompt="Say how the review feels.", precision=precision)
        assert loaded.precision == precision
        scores[precision] = list(choice_scores(loaded.model, loaded.tokenizer, loaded.template, conversations,
                                               LABELS, batch_size=4, progress=False))
    tolerance = 0.02  # nats per label: bf16 rounding of a 2-layer model's logits; measured up to ~0.003
    decided = 0
    for fp32, bf16 in zip(scores["no"], scores["bf16"]):
        assert bf16.logprobs == pytest.approx(fp32.logprobs, abs=tolerance)
        ranked = sorted(fp32.logprobs, reverse=True)
        if ranked[0] - ranked[1] > 2 * tolerance:
            decided += 1
            assert bf16.best() == fp32.best()
    assert decided >= len(conversations) // 2  # most examples are decided, so the check above is not empty
    # through `fewtune eval`: the same predictions on those, and results.json says which precision ran
    data = write_jsonl(tmp_path / "test.jsonl", [{"messages": [{"role": "user", "content": c[0].content},
                                                               {"role": "assistant", "content": LABELS[i % 4]}]}
                                                 for i, c in enumerate(conversations)])
    results = {p: evaluate(tiny_model, data, EvalSection(task="classification", labels=LABELS, precision=p, system_prompt="Say how the "
                                                         "review feels."), tmp_path / p) for p in ("no", "bf16")}
    for p, result in results.items():
        assert json.loads((tmp_path / p / "results.json").read_text())["settings"]["precision"] == p
    for f, b, fp32 in zip(results["no"].predictions, results["bf16"].predictions, scores["no"]):
        ranked = sorted(fp32.logprobs, reverse=True)
        if ranked[0] - ranked[1] > 2 * tolerance:
            assert f["predicted"] == b["predicted"]


def test_compare_runs_every_model_in_one_precision(trained_run, tiny_model, unforced, monkeypatch):
    monkeypatch.setattr(machine_precision, "cpu_bf16_speedup", lambda: 2.0)
    _say_trained_in(trained_run, "bf16")
    assert shared_precision("auto", [tiny_model, str(trained_run)]) == "bf16"  # the run's, for the base too
    assert shared_precision("no", [tiny_model, str(trained_run)]) == "no"
    monkeypatch.setattr(machine_precision, "cpu_bf16_speedup", lambda: 0.2)
    assert shared_precision("auto", [tiny_model, str(trained_run)]) == "no"
    assert shared_precision("auto", [tiny_model]) == "auto"  # no run: the first model's own choice holds


def test_export_of_a_bf16_run_stays_float32(trained_run, unforced, monkeypatch, tmp_path):
    from fewtune.export import export_merged

    monkeypatch.setattr(machine_precision, "cpu_bf16_speedup", lambda: 2.0)
    _say_trained_in(trained_run, "bf16")
    out = export_merged(trained_run, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert next(merged.parameters()).dtype == torch.float32
    assert json.loads((out / "config.json").read_text()).get("dtype", "float32") == "float32"
