"""`fewtune pseudo-label`: confidence, class-balanced selection, and labeling + retraining rounds on tiny runs."""

import json
import logging
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fewtune.cli import app
from fewtune.config import EvalSection, build_config, load_config, save_config
from fewtune.data.formats import DataError, Message, load_examples
from fewtune.data.render import Template, render_conversation
from fewtune.eval.scoring import ChoiceScore, choice_scores
from fewtune.generate import load_for_inference
from fewtune.workflows.pseudo import (PseudoError, PseudoSettings, Scored, class_targets, label_probabilities,
                                      pseudo_label, read_unlabeled, score_to_label, select, shared_system)
from fewtune.train.loop import train
from fewtune.advice.suggest import epochs_for_size
from tests.conftest import write_jsonl

runner = CliRunner()
POSITIVE = ["物流很快，包装很好", "质量不错，值得购买", "非常满意，好评", "耳机音质很好", "客服态度很好",
            "性价比很高", "做工精致", "发货速度快"]
NEGATIVE = ["质量太差了", "用了两天就坏了", "客服不理人", "包装破损严重", "和描述不符",
            "音质很差，亏了", "不会再买了", "退货太麻烦"]
UNLABELED = ["东西很好，推荐", "太差劲了", "还可以吧", "物流慢，包装差", "很喜欢这个颜色", "电池不耐用",
             "屏幕清晰", "声音太小", "下次还来", "不值这个价"]


@pytest.fixture(scope="module")
def labeled_run(tmp_path_factory, tiny_models) -> Path:
    """A finished classification run on the tiny model (3 steps), with a system prompt in its config."""
    folder = tmp_path_factory.mktemp("pseudo-run")
    data = write_jsonl(folder / "train.jsonl", [{"text": t, "label": "Positive"} for t in POSITIVE] +
                       [{"text": t, "label": "Negative"} for t in NEGATIVE])
    cfg = build_config({
        "model": {"name": tiny_models["llama"]},
        "data": {"train": str(data), "val_ratio": 0.25, "max_length": 64, "system_prompt": "判断评论的情感。"},
        "method": {"name": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "train": {"output_dir": str(folder / "run"), "max_steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_ratio": 0.0,
                  "seed": 3, "cache_tokenized": False},
        "eval": {"task": "classification", "metric": "accuracy"},
    })
    return Path(train(cfg).run_dir)


@pytest.fixture
def unlabeled(tmp_path) -> Path:
    """FewCLUE's shape: {"sentence", "id"}; one empty review, one repeated, one that is a labeled example."""
    rows = [{"sentence": t, "id": i} for i, t in enumerate(UNLABELED)]
    rows += [{"sentence": "  ", "id": 90}, {"sentence": UNLABELED[0], "id": 91}, {"sentence": POSITIVE[0], "id": 92}]
    return write_jsonl(tmp_path / "unlabeled.json", rows)


# ---------------------------------------------------------------- confidence


def test_confidence_is_the_softmax_of_choice_scores(labeled_run):
    loaded = load_for_inference(str(labeled_run))
    convs = [[Message("user", t)] for t in UNLABELED[:4]]
    labels = ["Positive", "Negative", "一般"]
    scores = list(choice_scores(loaded.model, loaded.tokenizer, loaded.template, convs, labels, progress=False))
    for i, s in enumerate(scores):
        denominator = sum(math.exp(lp) for lp in s.logprobs)  # by hand: e^lp / sum e^lp (no overflow at these sizes)
        by_hand = [math.exp(lp) / denominator for lp in s.logprobs]
        assert label_probabilities(s) == pytest.approx(by_hand, rel=1e-9)
        best = max(range(3), key=lambda j: s.logprobs[j])
        scored = score_to_label(i, s, labels)
        assert scored.label == labels[best] and scored.confidence == pytest.approx(by_hand[best], rel=1e-9)
        mean = [lp / n for lp, n in zip(s.logprobs, s.n_tokens)]
        norm = [math.exp(m) / sum(math.exp(x) for x in mean) for m in mean]
        assert label_probabilities(s, normalize=True) == pytest.approx(norm, rel=1e-9)
        assert score_to_label(i, s, labels, normalize=True).confidence == pytest.approx(max(norm), rel=1e-9)


def test_confidence_on_known_numbers():
    s = ChoiceScore([-1.0, -2.0, -4.0], [1, 2, 4])
    e = [math.exp(-1), math.exp(-2), math.exp(-4)]
    assert label_probabilities(s) == pytest.approx([x / sum(e) for x in e])
    assert label_probabilities(s, normalize=True) == pytest.approx([1 / 3] * 3)  # every mean is -1
    big = ChoiceScore([-1000.0, -1001.0], [3, 3])  # summed log-probs of long labels: no underflow to 0/0
    assert label_probabilities(big) == pytest.approx([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))])


# ---------------------------------------------------------------- selection


def _synthetic() -> list[Scored]:
    confs = {"A": [0.99, 0.98, 0.97, 0.95, 0.93, 0.91, 0.5], "B": [0.99, 0.92, 0.6], "C": [0.96, 0.95, 0.94, 0.93, 0.9]}
    out, i = [], 0
    for lab in ("C", "A", "B"):  # pool order mixes the classes
        for c in confs[lab]:
            out.append(Scored(i, lab, c))
            i += 1
    return out


def test_selection_threshold_balance_and_cap():
    scored, labels, counts = _synthetic(), ["A", "B", "C"], {"A": 20, "B": 10, "C": 10}
    kept, classes = select(scored, labels, 0.9, counts)  # above: A 6, B 2, C 5 (0.9 counts: >=)
    # proportions 2:1:1; ratios above/share: A 6/20, B 2/10, C 5/10; the low median 0.3 sets the scale:
    # A floor(20 * 0.3) = 6, B all of its 2 (its share would be 3), C floor(10 * 0.3) = 3 of its 5
    assert classes == {"A": {"scored": 7, "above_threshold": 6, "kept": 6}, "B": {"scored": 3, "above_threshold": 2, "kept": 2},
                       "C": {"scored": 5, "above_threshold": 5, "kept": 3}}
    assert sorted(s.confidence for s in kept if s.label == "A") == [0.91, 0.93, 0.95, 0.97, 0.98, 0.99]
    assert sorted(s.confidence for s in kept if s.label == "C") == [0.94, 0.95, 0.96]  # most confident first
    assert [s.index for s in kept] == sorted(s.index for s in kept)  # written in pool order
    kept, classes = select(scored, labels, 0.9, counts, balance=False)
    assert [classes[lab]["kept"] for lab in labels] == [6, 2, 5]
    kept, classes = select(scored, labels, 0.9, counts, balance=False, max_per_class=3)
    assert [classes[lab]["kept"] for lab in labels] == [3, 2, 3] and len(kept) == 8
    kept, classes = select(scored, labels, 0.9, counts, max_per_class=1)  # capped: 1/20, 1/10, 1/10 -> r = 1/10
    assert [classes[lab]["kept"] for lab in labels] == [1, 1, 1]  # A's share (2) is more than the cap lets it have
    kept, classes = select(scored, labels, 0.99, counts, balance=False)
    assert [classes[lab]["above_threshold"] for lab in labels] == [1, 1, 0] and len(kept) == 2
    kept, classes = select(scored, labels, 0.99, counts)  # ratios 1/20, 1/10, 0: r = 1/20 -> A 1, B floor(0.5) = 0
    assert [s.confidence for s in kept] == [0.99] and [classes[lab]["kept"] for lab in labels] == [1, 0, 0]
    kept, classes = select(scored, labels, 0.995, counts)  # none above anywhere: nothing kept
    assert kept == [] and [classes[lab]["kept"] for lab in labels] == [0, 0, 0]


def test_class_targets_equal_shares_without_labeled_counts():
    # D has no labeled example: equal shares for all, set by the scarcest class
    assert class_targets({"A": 9, "D": 4}, ["A", "D"], {"A": 5}) == {"A": 4, "D": 4}
    assert class_targets({"A": 7, "B": 3}, ["A", "B"], {"A": 84, "B": 76}) == {"A": 3, "B": 3}  # floor(84*3/76)=3
    assert class_targets({"A": 100, "B": 76}, ["A", "B"], {"A": 84, "B": 76}) == {"A": 84, "B": 76}


def test_one_scarce_class_does_not_cut_the_others_to_its_size():
    # FewCLUE tnews, seed 0's final model on 2,000 unlabeled titles: 15 classes of ~80 labeled each, confident
    # examples from 1 (stock) to 431; the scarcest class setting the scale kept 1 per class, 15 in all
    labeled = {"体育": 80, "军事": 79, "农业": 78, "国际": 79, "娱乐": 80, "房产": 80, "故事": 79, "教育": 80, "文化": 80,
               "旅游": 80, "汽车": 80, "电竞": 80, "科技": 79, "股票": 72, "财经": 79}
    above = {"体育": 52, "军事": 11, "农业": 22, "国际": 21, "娱乐": 431, "房产": 14, "故事": 322, "教育": 40, "文化": 68,
             "旅游": 15, "汽车": 10, "电竞": 67, "科技": 7, "股票": 1, "财经": 12}
    labels = list(labeled)
    targets = class_targets(above, labels, labeled, max_per_class=80)
    # the median class: 国际 21/79 (8th of 15 ratios); each class keeps min(what it has, floor(its share * 21/79))
    assert targets["股票"] == 1 and targets["科技"] == 7 and targets["汽车"] == 10 and targets["国际"] == 21
    assert targets["娱乐"] == targets["体育"] == targets["教育"] == 21 and targets["农业"] == 20  # floor(78 * 21/79)
    # 7 scarce classes keep all they have (1 + 7 + 10 + 11 + 12 + 14 + 15), 农业 20, the 7 others 21 each
    assert sum(targets.values()) == 70 + 20 + 7 * 21 == 237
    assert all(targets[lab] <= above[lab] for lab in labels)
    assert max(targets.values()) == 21  # no class above its share at the median scale: 娱乐 keeps 21 of 431


# ---------------------------------------------------------------- prompts


def test_unlabeled_prompts_render_like_the_labeled_ones(tmp_path, tokenizer):
    labeled = write_jsonl(tmp_path / "l.jsonl", [{"messages": [{"role": "system", "content": "Classify the review."},
                                                               {"role": "user", "content": t},
                                                               {"role": "assistant", "content": lab}]}
                                                 for t, lab in (("good", "Positive"), ("bad", "Negative"))])
    examples = load_examples(labeled)
    system = shared_system(examples, None)
    assert system == "Classify the review."
    src = write_jsonl(tmp_path / "u.json", [{"sentence": "good", "id": 7}, {"sentence": "meh", "id": 8}])
    pool, skipped = read_unlabeled(src, {"text": "sentence"}, system=system)
    template = Template.for_tokenizer(tokenizer)
    ids = lambda msgs: render_conversation(msgs, tokenizer, template, for_generation=True).input_ids
    assert ids(pool[0].messages) == ids(examples[0].prompt_messages) and pool[0].record_id == 7
    assert not any(skipped.values())
    mixed = examples + load_examples(write_jsonl(tmp_path / "m.jsonl", [{"text": "x", "label": "Positive"}]))
    with pytest.raises(PseudoError, match="--system"):
        shared_system(mixed, None)
    assert shared_system(mixed, "") is None
    with pytest.raises(DataError) as info:
        read_unlabeled(src)  # no `text` field without --map
    assert "u.json:1" in str(info.value) and "'text'" in str(info.value) and "--map text=" in str(info.value)
    pool, _ = read_unlabeled(src, prompt_format="Review: {sentence}")
    assert pool[1].messages[-1].content == "Review: meh"


def test_prompt_wording_mismatch_is_warned(tmp_path, caplog):
    from fewtune.workflows.pseudo import check_prompt_shape

    examples = load_examples(write_jsonl(tmp_path / "l.jsonl", [{"text": f"评论：{t}", "label": "P"} for t in POSITIVE]))
    pool, _ = read_unlabeled(write_jsonl(tmp_path / "u.jsonl", [{"text": t} for t in UNLABELED]))
    with caplog.at_level(logging.WARNING, logger="fewtune.workflows.pseudo"):
        check_prompt_shape(examples, pool, "{text}")
    assert "starts with '评论：'" in caplog.text
    caplog.clear()
    pool, _ = read_unlabeled(write_jsonl(tmp_path / "u.jsonl", [{"text": t} for t in UNLABELED]), prompt_format="评论：{text}")
    with caplog.at_level(logging.WARNING, logger="fewtune.workflows.pseudo"):
        check_prompt_shape(examples, pool, "评论：{text}")
    assert caplog.text == ""


# ---------------------------------------------------------------- rounds


def test_errors_are_clear(labeled_run, unlabeled, tmp_path):
    for threshold in (0, 1.5):
        with pytest.raises(PseudoError, match=r"threshold must be in \(0, 1\]"):
            pseudo_label(labeled_run, unlabeled, PseudoSettings(threshold=threshold))
    with pytest.raises(PseudoError, match="no config.yaml"):
        pseudo_label(tmp_path, unlabeled)
    with pytest.raises(DataError, match="file not found"):
        pseudo_label(labeled_run, tmp_path / "missing.json", PseudoSettings(rename={"text": "sentence"}))
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(DataError, match="empty"):
        pseudo_label(labeled_run, tmp_path / "empty.json", PseudoSettings(rename={"text": "sentence"}))
    with pytest.raises(PseudoError, match="at least two candidate labels"):
        pseudo_label(labeled_run, unlabeled, scoring=EvalSection(labels=["Positive"]))
    one_label = tmp_path / "one_label.yaml"  # the run's config, its eval section naming one label
    save_config(load_config(labeled_run / "config.yaml", ["eval.labels=[Positive]"]), one_label)
    with pytest.raises(PseudoError, match="at least two candidate labels"):
        pseudo_label(labeled_run, unlabeled, config=one_label)  # scored as the config's eval section says
    bad = runner.invoke(app, ["pseudo-label", str(labeled_run), "--unlabeled", str(unlabeled), "--config", str(one_label)])
    assert bad.exit_code == 2 and "at least two candidate labels" in bad.output
    with pytest.raises(PseudoError, match="--no-train labels once"):
        pseudo_label(labeled_run, unlabeled, PseudoSettings(rounds=2, train=False))
    bad = runner.invoke(app, ["pseudo-label", str(labeled_run), "--unlabeled", str(unlabeled), "--threshold", "2"])
    assert bad.exit_code == 2 and "threshold must be in (0, 1]" in bad.output
    bad = runner.invoke(app, ["pseudo-label", str(labeled_run), "--unlabeled", str(unlabeled)])
    assert bad.exit_code == 2 and "unlabeled.json:1" in bad.output and "--map text=" in bad.output


def test_one_round_labels_selects_and_retrains(labeled_run, unlabeled, tmp_path):
    # scored independently: the run's template (with its system prompt) and plain user turns
    loaded = load_for_inference(str(labeled_run), merge=True)  # as label_pool loads it
    assert loaded.template.system_prompt == "判断评论的情感。"
    scores = list(choice_scores(loaded.model, loaded.tokenizer, loaded.template, [[Message("user", t)] for t in UNLABELED],
                                ["Negative", "Positive"], progress=False))
    confidence = [max(label_probabilities(s)) for s in scores]
    ranked = sorted(confidence, reverse=True)
    assert ranked[4] - ranked[5] > 1e-7  # a threshold between them keeps exactly the 5 most confident
    threshold = (ranked[4] + ranked[5]) / 2
    wanted = [i for i, c in enumerate(confidence) if c >= threshold]
    out = tmp_path / "pl"
    result = pseudo_label(labeled_run, unlabeled, PseudoSettings(rename={"text": "sentence"}, threshold=threshold,
                                                                 balance=False), out_dir=out, progress=False)
    r1 = out / "round_1"
    summary = json.loads((r1 / "summary.json").read_text())
    assert summary == result.rounds[0] and summary["pool"] == len(UNLABELED)
    assert "epochs" not in summary  # no --epochs: the run's own training plan
    assert summary["skipped"] == {"empty prompt": 1, "duplicate within the unlabeled file": 1,
                                  "already a labeled example": 1}
    # pseudo.jsonl: the examples above the threshold, labeled with the argmax of the scores
    expected = [["Negative", "Positive"][scores[i].best()] for i in wanted]
    pseudo = [json.loads(line) for line in (r1 / "pseudo.jsonl").read_text().splitlines()]
    assert len(pseudo) == summary["kept"] == 5
    assert [p["provenance"]["id"] for p in pseudo] == wanted  # FewCLUE ids, in file order
    assert [p["messages"][0]["content"] for p in pseudo] == [UNLABELED[i] for i in wanted]
    assert [p["label"] for p in pseudo] == expected
    assert [p["messages"][-1]["content"] for p in pseudo] == expected
    assert all(p["pseudo"] is True and p["provenance"]["set"] == "pseudo" for p in pseudo)
    assert [p["confidence"] for p in pseudo] == pytest.approx([confidence[i] for i in wanted], abs=1e-6)
    assert sum(c["above_threshold"] for c in summary["classes"].values()) == 5
    assert sum(c["scored"] for c in summary["classes"].values()) == len(UNLABELED)
    counts = {lab: expected.count(lab) for lab in ("Negative", "Positive")}
    assert {lab: c["kept"] for lab, c in summary["classes"].items()} == counts
    # labeled training part + kept; validation is the run's own labeled validation split
    run_summary = json.loads((labeled_run / "summary.json").read_text())
    combined = [json.loads(line) for line in (r1 / "train.jsonl").read_text().splitlines()]
    assert len(combined) == run_summary["train_examples"] + len(pseudo)
    assert sum(r.get("pseudo", False) for r in combined) == len(pseudo)
    validation = (r1 / "validation.jsonl").read_text().splitlines()
    assert len(validation) == run_summary["val_examples"] and '"pseudo"' not in "".join(validation)
    # round_1 holds a finished run trained on that file
    new = json.loads((r1 / "run" / "summary.json").read_text())
    assert (r1 / "run" / "adapter" / "adapter_config.json").exists()
    assert new["train_examples"] == len(combined) and new["val_examples"] == run_summary["val_examples"]
    assert summary["training"]["eval_metric"] == "accuracy" and summary["training"]["best"] == new["best_metric"]
    assert "| Positive |" in (r1 / "summary.md").read_text()
    assert len((r1 / "scores.jsonl").read_text().splitlines()) == len(UNLABELED)


def test_no_train_only_labels_with_balance(labeled_run, unlabeled, tmp_path):
    out = tmp_path / "pl"
    result = pseudo_label(labeled_run, unlabeled, PseudoSettings(rename={"text": "sentence"}, threshold=0.5, train=False,
                                                                 max_per_class=1), out_dir=out, progress=False)
    s = result.rounds[0]
    assert s["training"] is None and not (out / "round_1" / "run").exists()
    assert s["balance"] == "labeled class proportions"
    kept = {lab: c["kept"] for lab, c in s["classes"].items()}
    scored = {lab: c["scored"] for lab, c in s["classes"].items()}
    # the labeled training part is balanced (6/6): with both classes predicted, one each; otherwise none
    assert kept == ({"Negative": 1, "Positive": 1} if all(scored.values()) else {"Negative": 0, "Positive": 0})
    assert len((out / "round_1" / "pseudo.jsonl").read_text().splitlines()) == sum(kept.values())


def test_excluded_prompts_and_nothing_kept(labeled_run, unlabeled, tmp_path):
    test_set = write_jsonl(tmp_path / "test_public.json", [{"sentence": UNLABELED[1], "label": "Negative", "id": 5}])
    out = tmp_path / "pl"
    result = pseudo_label(labeled_run, unlabeled, PseudoSettings(rename={"text": "sentence"}, threshold=1.0, rounds=2,
                                                                 exclude=[test_set]), out_dir=out, progress=False)
    assert len(result.rounds) == 1  # nothing reached p = 1.0: no retraining, and round 2 would change nothing
    s = result.rounds[0]
    assert s["pool"] == len(UNLABELED) - 1 and s["skipped"][f"in {test_set}"] == 1 and s["kept"] == 0
    assert s["stopped"].startswith("nothing kept") and s["training"] is None
    assert not (out / "round_1" / "run").exists() and not (out / "round_2").exists()
    texts = [json.loads(line)["text"] for line in (out / "round_1" / "scores.jsonl").read_text().splitlines()]
    assert UNLABELED[1] not in texts and len(texts) == len(UNLABELED) - 1
    assert "Stopped: nothing kept" in (out / "round_1" / "summary.md").read_text()


def test_two_rounds_from_the_command_line(labeled_run, unlabeled, tmp_path):
    out = tmp_path / "pl2"
    result = runner.invoke(app, ["pseudo-label", str(labeled_run), "--unlabeled", str(unlabeled), "--map", "text=sentence",
                                 "--threshold", "0.5", "--no-balance", "--rounds", "2", "--limit", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "round 1: kept" in result.output and "round 2: kept" in result.output
    overview = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in overview["rounds"]] == [1, 2]
    assert overview["rounds"][0]["labeled_by"] == str(labeled_run)
    assert overview["rounds"][1]["labeled_by"] == str(out / "round_1" / "run")  # the newest model labels round 2
    for k in (1, 2):
        assert json.loads((out / f"round_{k}" / "run" / "summary.json").read_text())["steps"] == 3
        assert overview["rounds"][k - 1]["pool"] == 6 and overview["rounds"][k - 1]["kept"] == 6
    assert "| 2 |" in (out / "summary.md").read_text()


def test_retraining_epochs_follow_the_grown_training_set(labeled_run, unlabeled, tmp_path):
    # the run's config trained by epochs (no max_steps): 7 epochs, batch 4
    by_epochs = tmp_path / "by_epochs.yaml"
    save_config(load_config(labeled_run / "config.yaml", ["train.max_steps=null", "train.epochs=7"]), by_epochs)
    n_labeled = json.loads((labeled_run / "summary.json").read_text())["train_examples"]
    out = tmp_path / "auto"
    result = pseudo_label(labeled_run, unlabeled, PseudoSettings(rename={"text": "sentence"}, threshold=0.5,
                                                                 balance=False, epochs="auto"),
                          out_dir=out, config=by_epochs, progress=False)
    s = result.rounds[0]
    n = n_labeled + s["kept"]
    assert s["kept"] == len(UNLABELED)  # two labels: every probability at the argmax is >= 0.5
    want, why = epochs_for_size(n, 4)
    assert s["epochs"] == {"value": want, "was": 7, "why": why} and want != 7
    run = out / "round_1" / "run"
    assert load_config(run / "config.yaml").train.epochs == want
    assert json.loads((run / "summary.json").read_text())["steps"] == math.ceil(n / 4) * want
    assert f"{want:g} epochs instead of the run's 7" in (out / "round_1" / "summary.md").read_text()
    # a number from the command line, on the run's own config (max_steps 3): the steps follow the epochs
    cli = tmp_path / "cli"
    ok = runner.invoke(app, ["pseudo-label", str(labeled_run), "--unlabeled", str(unlabeled), "--map", "text=sentence",
                             "--threshold", "0.5", "--no-balance", "--limit", "4", "--epochs", "2", "--out", str(cli)])
    assert ok.exit_code == 0, ok.output
    assert load_config(labeled_run / "config.yaml").train.max_steps == 3
    assert json.loads((cli / "round_1" / "run" / "summary.json").read_text())["steps"] == math.ceil((n_labeled + 4) / 4) * 2
    assert "max_steps (3) dropped" in json.loads((cli / "round_1" / "summary.json").read_text())["epochs"]["why"]
    for bad_value, words in (("many", "epochs"), ("0", "--epochs must be above 0")):
        bad = runner.invoke(app, ["pseudo-label", str(labeled_run), "--unlabeled", str(unlabeled), "--map",
                                  "text=sentence", "--epochs", bad_value, "--out", str(tmp_path / "bad")])
        assert bad.exit_code == 2 and words in bad.output, bad.output
    assert not (tmp_path / "bad").exists()


def test_an_ensemble_labels_with_its_members_mean_probabilities(labeled_run, unlabeled, tmp_path):
    """pseudo_label(teachers=...): each prompt's label probabilities are the mean of the members' own (each member
    labeling alone, as label_pool does), the argmax is the label; a teacher that is not a run is refused."""
    from fewtune.workflows.pseudo import label_pool

    cfg = load_config(labeled_run / "config.yaml")
    second = Path(train(build_config(cfg.model_dump(mode="json"), ["train.seed=11", "train.lr=0.003",
                                                                    f'train.output_dir="{tmp_path / "second"}"'])).run_dir)
    out = tmp_path / "pl"
    settings = PseudoSettings(rename={"text": "sentence"}, threshold=0.5, train=False, balance=False)
    result = pseudo_label(labeled_run, unlabeled, settings, out_dir=out, progress=False, teachers=[second])
    s = result.rounds[0]
    assert s["ensemble"] == [str(labeled_run), str(second)] and "1 ensemble member" in s["labeled_by"]
    rows = [json.loads(line) for line in (out / "round_1" / "scores.jsonl").read_text().splitlines()]
    pool, _ = read_unlabeled(unlabeled, {"text": "sentence"}, system="判断评论的情感。")
    pool = [u for u in pool if u.messages[-1].content not in POSITIVE]  # as pseudo_label drops labeled prompts
    labels = ["Negative", "Positive"]
    alone = [label_pool(run, pool, labels, progress=False) for run in (labeled_run, second)]
    assert len(rows) == len(pool)
    for i, row in enumerate(rows):
        mean = {lab: (alone[0][i].probs[lab] + alone[1][i].probs[lab]) / 2 for lab in labels}
        assert row["probs"] == pytest.approx(mean, abs=1e-5)
        assert row["predicted"] == max(labels, key=lambda lab: mean[lab])
        assert row["confidence"] == pytest.approx(max(mean.values()), abs=1e-5)
    with pytest.raises(PseudoError, match="ensemble member must be a finished run"):
        pseudo_label(labeled_run, unlabeled, settings, out_dir=tmp_path / "bad", progress=False, teachers=[tmp_path])
