"""Every metric against values worked out by hand on small cases (Chinese included)."""

import math

import numpy as np
import pytest

from fewtune.eval.metrics import (UNPARSEABLE, classification_metrics, confused_pairs, json_fields,
                                  json_task_metrics, map_to_label, normalize_text)
from fewtune.eval.stats import bootstrap_interval, f1_codes, mcnemar, paired_difference
from fewtune.eval.text_metrics import (CJKTokenizer, bleu_from_statistics, bleu_statistics, exact_matches,
                                       generation_metrics, rouge_scores)


def test_classification_metrics_by_hand():
    expected = ["a", "a", "b", "b", "c"]
    predicted = ["a", "b", "b", "b", UNPARSEABLE]
    m = classification_metrics(expected, predicted, ["a", "b", "c"])
    # a: P 1/1, R 1/2, F1 2/3; b: P 2/3, R 2/2, F1 4/5; c: nothing predicted, R 0, F1 0
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["macro_precision"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert m["macro_recall"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    assert m["weighted_f1"] == pytest.approx((2 * 2 / 3 + 2 * 4 / 5 + 0) / 5)
    assert m["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8), "support": 2}
    assert m["unparseable"] == 1 and m["unparseable_rate"] == pytest.approx(0.2)
    assert m["confusion"]["labels"] == ["a", "b", "c", UNPARSEABLE]
    assert m["confusion"]["matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1]]
    assert confused_pairs(m["confusion"]) == [{"expected": "a", "predicted": "b", "count": 1},
                                              {"expected": "c", "predicted": UNPARSEABLE, "count": 1}]
    with pytest.raises(ValueError, match="not among the candidate labels"):
        classification_metrics(["z"], ["a"], ["a", "b"])


def test_map_generated_text_to_labels():
    labels = ["PlayMusic", "GetWeather", "Music"]
    assert map_to_label("  playmusic. ", labels) == ("PlayMusic", "exact")
    assert map_to_label("Play Music", labels) == ("PlayMusic", "exact")
    assert map_to_label("GetWeather\nbecause it asks about rain", labels) == ("GetWeather", "first_line")
    assert map_to_label("The intent is: GetWeather!", labels) == ("GetWeather", "contains")
    # "Music" inside the matched "PlayMusic" does not make it ambiguous
    assert map_to_label("I think PlayMusic fits", labels) == ("PlayMusic", "contains")
    assert map_to_label("either PlayMusic or GetWeather", labels) == (UNPARSEABLE, "none")
    assert map_to_label("no idea", labels) == (UNPARSEABLE, "none")
    assert map_to_label("这是正面的评价", ["正面", "负面"]) == ("正面", "contains")
    assert normalize_text("Hello,  World!") == "hello world"


def test_rouge_on_chinese_counts_characters():
    # pred 4 characters, all in the 7-character reference: R1 P=1 R=4/7 -> F=8/11;
    # bigrams 3 of 6 -> F=2/3; LCS 4 -> F=8/11
    r = rouge_scores(["我爱北京"], ["我爱北京天安门"])
    assert r["rouge1"][0] == pytest.approx(8 / 11)
    assert r["rouge2"][0] == pytest.approx(2 / 3)
    assert r["rougeL"][0] == pytest.approx(8 / 11)
    assert CJKTokenizer().tokenize("我爱Beijing 2024!") == ["我", "爱", "beijing", "2024"]
    # rouge-score's own tokenizer drops Chinese entirely: the reason for ours
    from rouge_score import rouge_scorer

    assert rouge_scorer.RougeScorer(["rouge1"]).score("我爱北京天安门", "我爱北京")["rouge1"].fmeasure == 0.0


def test_bleu_chinese_and_english_by_hand():
    # every n-gram of the 4-character prediction matches; brevity penalty exp(1 - 7/4)
    m = generation_metrics(["我爱北京"], ["我爱北京天安门"])
    assert m["bleu_tokenize"] == "zh"
    assert m["bleu"] == pytest.approx(100 * math.exp(1 - 7 / 4), rel=1e-6)
    assert m["rouge1"] == pytest.approx(8 / 11) and m["exact_match"] == 0.0
    assert m["mean_length"] == 4 and m["mean_reference_length"] == 7
    en = generation_metrics(["the cat sat on the mat", "Hello, world!"], ["the cat sat on the mat", "hello world"])
    assert en["bleu_tokenize"] == "13a" and en["exact_match"] == 1.0
    # corpus BLEU from summed per-example statistics equals sacrebleu's corpus score
    import sacrebleu

    preds, refs = ["我爱北京天安门", "今天天气很好", "a b c d e"], ["我爱北京", "今天天气不错", "a b c d f"]
    stats = bleu_statistics(preds, refs, "zh")
    assert stats.shape == (3, 10)
    assert bleu_from_statistics(stats.sum(0)) == pytest.approx(sacrebleu.corpus_bleu(preds, [refs], tokenize="zh").score)
    assert list(exact_matches(["A.", "b"], ["a", "c"])) == [1.0, 0.0]


def test_json_field_metrics_by_hand():
    preds = ['{"actions": ["打开车窗", "打开空调"], "conditions": []}', "not json"]
    refs = ['{"conditions": ["上车"], "actions": ["打开空调", "打开车窗"]}', '{"a": 1}']
    m = json_task_metrics(preds, refs)
    # example 1: 2 facts predicted, 3 expected, 2 shared (list order ignored); example 2: invalid, 1 expected
    assert m["json_valid"] == 0.5 and m["exact_match"] == 0.0
    assert m["field_precision"] == pytest.approx(2 / 2)
    assert m["field_recall"] == pytest.approx(2 / 4)
    assert m["field_f1"] == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert m["per_field"]["actions"]["f1"] == 1.0 and m["per_field"]["conditions"]["recall"] == 0.0
    assert m["invalid"] == [{"index": 1, "output": "not json"}] and m["invalid_count"] == 1
    assert json_fields({"a": {"b": 1}, "c": ["x", "x", "y"]}) == {("a.b", "1"), ("c", '"x"'), ("c", '"y"')}


def test_the_demo_prints_the_eval_json_metrics():
    """`make demo`'s exact match and JSON valid are `fewtune eval`'s, with the shape the demo always had."""
    from fewtune.demo.run import demo_metrics

    assert demo_metrics(['{"a": [2, 1]}', "{"], ['{"a": [1, 2]}', '{"a": 1}']) == {"json_valid": 0.5, "exact_match": 0.5, "n": 2}
    refs = ['{"conditions": ["上车"], "actions": ["播放QQ音乐"]}'] * 4
    preds = [' {"actions": ["播放QQ音乐"], "conditions": ["上车"]}\n',  # whitespace and key order: exact
             '{"conditions": [], "actions": ["播放QQ音乐"]}',  # valid, not exact
             '{"conditions": ["上车"], "actions": ["播放QQ音乐"]} trailing',  # not one JSON value: invalid
             '']
    m = demo_metrics(preds, refs)
    assert m == {"json_valid": 0.5, "exact_match": 0.25, "n": 4}
    assert {k: json_task_metrics(preds, refs)[k] for k in m} == m
    with pytest.raises(ValueError, match="reference is not valid JSON"):
        demo_metrics(["{}"], ["not json"])


def test_mcnemar_exact_by_hand():
    a = [True] * 2 + [False] * 8 + [True] * 5
    b = [False] * 2 + [True] * 8 + [True] * 5
    m = mcnemar(a, b)
    assert (m["only_a_correct"], m["only_b_correct"]) == (2, 8)
    assert m["p_value"] == pytest.approx(2 * (1 + 10 + 45) / 1024)  # two-sided binomial, n=10, k<=2
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0


def test_fast_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 400)
    p = np.where(rng.random(400) < 0.6, y, rng.integers(0, 6, 400))  # 5 = unparseable
    for average in ("macro", "weighted"):
        assert f1_codes(y, p, 5, average) == pytest.approx(f1_score(y, p, labels=range(5), average=average, zero_division=0))
    # class 4 neither expected nor predicted: left out of the average, as in classification_metrics
    y2, p2 = np.where(y == 4, 0, y), np.where(p == 4, 0, p)
    assert f1_codes(y2, p2, 5) == pytest.approx(f1_score(y2, p2, labels=range(4), average="macro", zero_division=0))
    names = ["a", "b", "c", "d", "e"]
    m = classification_metrics([names[i] for i in y2], [names[i] if i < 5 else UNPARSEABLE for i in p2], names)
    assert m["macro_f1"] == pytest.approx(f1_codes(y2, p2, 5))


def test_paired_bootstrap_interval_covers_the_true_difference():
    """Synthetic pair of models with known accuracies 0.60 and 0.70: the 95% interval of the difference
    should contain the true 0.10 in about 95% of repeated experiments and exclude 0 when it is real."""
    rng = np.random.default_rng(0)
    covered, significant = 0, 0
    reps, n = 40, 600
    for rep in range(reps):
        u = rng.random(n)
        a = u < 0.60  # correlated, as two models on the same examples are
        b = u < 0.75
        flip = rng.random(n) < 0.1
        b = np.where(flip, ~b, b)  # true accuracy of b: 0.75*0.9 + 0.25*0.1 = 0.70
        d = paired_difference(lambda i: a[i].mean(), lambda i: b[i].mean(), n, n_resamples=500, seed=rep)
        covered += d["interval"]["low"] <= 0.10 <= d["interval"]["high"]
        significant += d["significant"]
    assert covered >= 0.8 * reps
    assert significant == reps
    same = np.random.default_rng(5).random(300) < 0.5
    d = paired_difference(lambda i: same[i].mean(), lambda i: same[i].mean(), 300, n_resamples=200)
    assert d["difference"] == 0 and d["interval"]["low"] == 0 and not d["significant"]
    one = bootstrap_interval(lambda i: same[i].mean(), 300, n_resamples=300)
    assert one.low < same.mean() < one.high
