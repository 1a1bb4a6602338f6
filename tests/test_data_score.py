"""`fewtune data score`: per-example loss under a model, text signals, outlier flags, filtering with nothing lost."""

import json

import pytest
from typer.testing import CliRunner

from fewtune.cli import app
from fewtune.quality.score import Scored, flag, repetition, robust_z
from tests.conftest import write_jsonl

runner = CliRunner()


def test_signals_without_a_model():
    assert repetition("turn on the light turn on the light turn on the light") > 0.5
    assert repetition("打开车窗") == 0.0 and repetition("one two three four five") == 0.0
    assert robust_z([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]
    z = robust_z([1.0, 1.1, 0.9, 1.0, 9.0])
    assert z[-1] > 3.5 and all(abs(v) < 3.5 for v in z[:-1])
    scored = [Scored(i, 1.0 + 0.01 * i, 5, 10, 0.0, "zh", "zh") for i in range(9)]
    scored.append(Scored(9, 8.0, 5, 10, 0.0, "en", "zh"))
    scored.append(Scored(10, 1.02, 5, 0, 0.0, "zh", "zh"))
    scored.append(Scored(11, 1.3, 5, 10, 0.0, "zh", "zh"))  # z far above 3.5, but only 0.26 nats above the median
    flag(scored)
    assert scored[11].flags == []
    assert scored[0].flags == []
    assert any("loss 8.00 far above" in f for f in scored[9].flags) and any("completion in language en" in f for f in scored[9].flags)
    assert scored[10].flags == ["empty completion"]


@pytest.fixture
def planted(tmp_path):
    """40 car commands with their JSON answers, and 2 planted faults: an answer that has nothing to do with its
    command (long, repetitive) and an English answer in a Chinese set."""
    rows = [{"prompt": f"打开车窗 {i}", "completion": "{\"actions\":[\"打开车窗\"]}"} for i in range(38)]
    rows.append({"prompt": "打开空调", "completion": "blah blah blah blah blah blah blah blah blah blah blah blah"})
    rows.append({"prompt": "关闭车窗", "completion": "The window will now be closed for you, have a nice day"})
    return write_jsonl(tmp_path / "planted.jsonl", rows)


def test_score_command_flags_the_planted_faults_and_filters(tiny_model, planted, tmp_path):
    out, keep, rejects = tmp_path / "scores.jsonl", tmp_path / "keep.jsonl", tmp_path / "rejects.jsonl"
    result = runner.invoke(app, ["data", "score", str(planted), "--model", tiny_model, "--out", str(out), "--keep",
                                 str(keep), "--rejects", str(rejects), "--drop-worst", "5", "--drop-flagged",
                                 "--precision", "no"])
    assert result.exit_code == 0, result.output
    scores = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["line"] for s in scores] == list(range(1, 41))
    assert all(s["loss"] > 0 and s["tokens"] > 0 for s in scores)
    flagged = {s["line"] for s in scores if s["flags"]}
    assert {39, 40} <= flagged and len(flagged) <= 4
    assert any("repeats itself" in f for f in scores[38]["flags"])
    assert any("completion in language en" in f for f in scores[39]["flags"])
    kept = [json.loads(line) for line in keep.read_text().splitlines()]
    rejected = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert len(kept) + len(rejected) == 40  # nothing lost
    assert {r["line"] for r in rejected} >= {39, 40} and all(r["reasons"] for r in rejected)
    assert kept[0] == {"prompt": "打开车窗 0", "completion": "{\"actions\":[\"打开车窗\"]}"}  # the records as read
    # 5% of 40: the 2 highest losses are left out whatever their flags
    worst = sorted(scores, key=lambda s: -s["loss"])[:2]
    assert {s["line"] for s in worst} <= {r["line"] for r in rejected}
    assert "flagged" in result.output and "line 39" in result.output


def test_score_errors_are_one_line(tiny_model, planted, tmp_path):
    for args, message in [(["--drop-worst", "5"], "need --keep FILE and --rejects FILE"),
                          (["--keep", str(tmp_path / "k.jsonl")], "give --keep and --rejects together"),
                          (["--model", tiny_model, "--run", str(tmp_path)], "give --model or --run, not both")]:
        bad = runner.invoke(app, ["data", "score", str(planted), *args])
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)
