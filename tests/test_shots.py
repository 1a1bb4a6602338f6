"""In-context examples for the prompting baseline: the draw, the conversation, and eval/compare with --shots."""

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from fewtune.cli import app
from fewtune.config import EvalSection
from fewtune.data.formats import Example, Message, load_examples
from fewtune.data.render import Template, render_conversation
from fewtune.eval.evaluate import evaluate
from fewtune.eval.shots import ShotsError, pick_shots, with_shots
from tests.conftest import write_jsonl

runner = CliRunner()
LABELS = [f"intent{i}" for i in range(7)]


def _pool(n_per_label=5):
    return [Example([Message("user", f"text {lab} {k}"), Message("assistant", lab)], "pool", i + 1, label=lab)
            for i, (lab, k) in enumerate((lab, k) for lab in LABELS for k in range(n_per_label))]


def test_stratified_draw_spreads_over_the_labels_and_is_seeded():
    pool = _pool()
    four = pick_shots(pool, 4, seed=0, stratify=True)
    assert len({e.label for e in four}) == 4
    eight = Counter(e.label for e in pick_shots(pool, 8, seed=0, stratify=True))
    assert set(eight) == set(LABELS) and sorted(eight.values()) == [1] * 6 + [2]
    assert [e.line for e in pick_shots(pool, 8, seed=0, stratify=True)] == [e.line for e in
                                                                           pick_shots(pool, 8, seed=0, stratify=True)]
    assert {e.line for e in pick_shots(pool, 8, seed=1, stratify=True)} != {e.line for e in
                                                                           pick_shots(pool, 8, seed=0, stratify=True)}


def test_shots_never_repeat_an_evaluated_input():
    pool = _pool(n_per_label=1)
    evaluated = pool[:5]
    for seed in range(10):
        picked = pick_shots(pool, 2, seed=seed, avoid=evaluated, stratify=True)
        assert not {e.line for e in picked} & {e.line for e in evaluated}
    with pytest.raises(ShotsError, match="the pool has 2 usable examples"):
        pick_shots(pool, 3, seed=0, avoid=evaluated)


def test_shots_are_earlier_turns_after_the_system_message(tokenizer):
    shots = _pool(n_per_label=1)[:2]
    query = Example([Message("system", "Classify."), Message("user", "play jazz")], "q", 1, label="intent0")
    shot = with_shots(query, shots)
    assert [m.role for m in shot.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert shot.messages[1].content == shots[0].messages[0].content and shot.messages[2].content == shots[0].label
    assert shot.label == "intent0" and shot.prompt_messages[-1].content == "play jazz"
    template = Template.for_tokenizer(tokenizer)
    plain = tokenizer.decode(render_conversation(query.messages, tokenizer, template, for_generation=True).input_ids)
    with_ = tokenizer.decode(render_conversation(shot.messages, tokenizer, template, for_generation=True).input_ids)
    # the query ends the prompt exactly as without shots; the system message comes once, first
    tail = plain[plain.index("<|im_start|>user"):]
    assert with_.endswith(tail) and with_.count("Classify.") == 1 and with_.index("Classify.") < with_.index("text")


@pytest.fixture
def files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"train {lab} {k}", "label": lab}
                                                     for lab in LABELS[:3] for k in range(4)])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": f"test {lab} {k}", "label": lab}
                                                   for lab in LABELS[:3] for k in range(2)])
    return train, test


def test_eval_with_shots_scores_the_prompt_with_the_shots(tiny_model, files, tmp_path):
    train, test = files
    settings = EvalSection(shots=3, shots_from=str(train), shots_seed=4, precision="no")
    result = evaluate(tiny_model, test, settings, output_dir=tmp_path / "shots")
    used = result.settings
    assert used["shots"] == 3 and used["shots_from"] == str(train) and len(used["shot_lines"]) == 3
    # the same shots written into the test file by hand give the same scores: the shots are what was scored
    pool = {e.line: e for e in load_examples(train)}
    shots = [pool[line] for line in used["shot_lines"]]
    assert len({e.label for e in shots}) == 3  # stratified: the three labels
    by_hand = write_jsonl(tmp_path / "by_hand.jsonl", [
        {"messages": [m.__dict__ | {"weight": None} for m in with_shots(e, shots).messages], "label": e.label}
        for e in load_examples(test)])
    hand = evaluate(tiny_model, by_hand, EvalSection(precision="no", labels=sorted(LABELS[:3])))
    zero = evaluate(tiny_model, test, EvalSection(precision="no"))
    def flat(res):
        return [r["logprobs"][lab] for r in res.predictions for lab in sorted(LABELS[:3])]

    assert flat(result) == pytest.approx(flat(hand), abs=1e-4)
    assert flat(result) != pytest.approx(flat(zero), abs=1e-3)
    assert [r["input"] for r in result.predictions] == [r["input"] for r in zero.predictions]  # the query, not the shots


def test_eval_and_compare_command_lines(tiny_models, files, tmp_path):
    train, test = files
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("You sort requests into intents. Answer with the intent only.\n", encoding="utf-8")
    out = tmp_path / "ev"
    ok = runner.invoke(app, ["eval", tiny_models["llama"], "--data", str(test), "--shots", "2", "--shots-from",
                             str(train), "--prompt-file", str(prompt), "-o", str(out)])
    assert ok.exit_code == 0, ok.output
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["shots"] == 2 and settings["system_prompt"].startswith("You sort requests")
    for args, message in [(["--shots", "2"], "give --shots-from TRAIN_FILE"),
                          (["--shots", "2", "--shots-from", str(tmp_path / "nope.jsonl")], "file not found"),
                          (["--shots", "50", "--shots-from", str(train)], "50 shots asked"),
                          (["--prompt-file", str(prompt), "--system", "x"], "--system or --prompt-file, not both"),
                          (["--prompt-file", str(tmp_path)], "is a directory")]:
        bad = runner.invoke(app, ["eval", tiny_models["llama"], "--data", str(test), *args])
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)
    cmp_out = tmp_path / "cmp"
    both = runner.invoke(app, ["compare", tiny_models["llama"], tiny_models["qwen2"], "--data", str(test), "--shots", "1",
                               "--shots-from", str(train), "-o", str(cmp_out)])
    assert both.exit_code == 0, both.output
    lines = [json.loads((d / "results.json").read_text())["settings"]["shot_lines"]
             for d in sorted((cmp_out / "models").iterdir())]
    assert len(lines) == 2 and lines[0] == lines[1] and len(lines[0]) == 1  # the same shot for both models


def test_baseline_table_and_advice(make_config, files, tmp_path):
    """Zero-shot and 1/2-shot of the base model against a (tiny) fine-tuned run: one row each, intervals, the
    fine-tuned run compared with the best prompt, and the advice line."""
    from fewtune.eval.baseline import advise
    from fewtune.train.loop import train

    train_file, test = files
    run = tmp_path / "run"
    train(make_config(**{"data.train": str(train_file), "train.max_steps": 2, "train.output_dir": str(run)}))
    out = tmp_path / "baseline"
    result = runner.invoke(app, ["baseline", str(train_file), "--test", str(test), "--run", str(run), "--shots", "0,1,2",
                                 "-o", str(out), "--precision", "no"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "baseline.json").read_text())
    assert [r["setting"] for r in report["rows"]] == ["zero-shot", "1-shot", "2-shot", "fine-tuned"]
    for row in report["rows"]:
        assert row["interval"]["low"] <= row["value"] <= row["interval"]["high"]
        per_setting = json.loads((out / row["setting"] / "results.json").read_text())
        assert per_setting["metrics"]["accuracy"] == row["value"]
        assert len(row["shot_lines"]) == row["shots"]
    best = max(report["rows"][:3], key=lambda r: r["value"])
    assert report["comparison"]["against"] == best["setting"]
    assert report["comparison"]["difference"] == pytest.approx(report["rows"][3]["value"] - best["value"])
    assert report["advice"] in result.output and "| fine-tuned |" in result.output
    # the advice follows the paired interval
    rows = [{"setting": "4-shot", "kind": "prompt", "value": 0.7}]
    assert advise(rows, {"difference": 0.2, "interval": {"low": 0.1, "high": 0.3}}, "accuracy").endswith(": fine-tune.")
    assert "keep prompting" in advise(rows, {"difference": -0.2, "interval": {"low": -0.3, "high": -0.1}}, "accuracy")
    assert "no difference" in advise(rows, {"difference": 0.01, "interval": {"low": -0.1, "high": 0.1}}, "accuracy")
    assert "give --run" in advise(rows, None, "accuracy")
    bad = runner.invoke(app, ["baseline", str(train_file), "--test", str(test), "--shots", "1,x"])
    assert bad.exit_code == 2 and "give counts separated by commas" in bad.output
