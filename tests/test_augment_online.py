"""data.augment: fresh augmentations of training examples each epoch, on a tiny model.

Same number of examples every epoch (same steps), validation and replayed examples never touched,
the same data in every run with the same seed and after a resume, prob 0 is no augmentation, and
methods that need a model are refused with what to do instead."""

from __future__ import annotations

import json

import pytest

from fewtune.config import ConfigError
from fewtune.train.loop import Interrupted, Trainer, train
from tests.conftest import write_jsonl

UTTERANCES = ["please play some relaxing music from the eighties", "what will the weather be like tomorrow in paris",
              "add this song to my evening playlist", "book a table for two at an italian restaurant",
              "find the movie schedule for the nearest cinema", "rate this novel four out of five stars",
              "turn up the volume of the kitchen speaker", "show me the forecast for the coming weekend"]


@pytest.fixture
def texts(tmp_path):
    rows = [{"prompt": f"{u} number {i}", "completion": f"intent {i % 3}"} for i in range(3) for u in UTTERANCES]
    return write_jsonl(tmp_path / "texts.jsonl", rows)


def epoch_texts(trainer, epoch, tokenizer):
    items, _ = trainer.augmenter.epoch_items(epoch)
    return [tokenizer.decode(r.input_ids) for r in items]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_each_epoch_gets_its_own_augmentations_of_the_training_examples_only(make_config, texts, tokenizer, tmp_path):
    general = write_jsonl(tmp_path / "general.jsonl", [{"prompt": f"tell me a story about a brave dragon {i}",
                                                        "completion": "once upon a time"} for i in range(12)])
    cfg = make_config(data__train=str(texts), data__val_ratio=0.25, data__replay__general=str(general),
                      data__replay__ratio=0.5, data__augment__methods="[noise]", data__augment__prob=0.6)
    trainer = Trainer(cfg)
    plain = [tokenizer.decode(r.input_ids) for r in trainer.train_set.items]
    task = set(trainer.augmenter.augmentable)
    assert len(task) == 18 and len(plain) == 18 + 9  # 24 minus 6 held out, plus 0.5 x 18 replayed
    e0, e1 = epoch_texts(trainer, 0, tokenizer), epoch_texts(trainer, 1, tokenizer)
    assert len(e0) == len(e1) == len(plain)
    for epoch in (e0, e1):
        changed = {i for i, (a, b) in enumerate(zip(plain, epoch)) if a != b}
        assert changed <= task and 0.3 * len(task) <= len(changed) <= 0.9 * len(task)
        for i in changed:  # the answer is kept: only the user turn changed
            assert epoch[i].endswith(plain[i][plain[i].rindex("intent"):])
    assert e0 != e1
    assert epoch_texts(Trainer(cfg), 1, tokenizer) == e1  # a rebuilt trainer (a resume) sees the same epoch
    assert trainer.augmenter.epoch_items(1)[0] is trainer.augmenter.epoch_items(1)[0]  # made once per epoch
    # validation is what it is without augmentation
    no_aug = Trainer(make_config(data__train=str(texts), data__val_ratio=0.25, data__replay__general=str(general),
                                 data__replay__ratio=0.5))
    assert [r.input_ids for r in no_aug.val_set.items] == [r.input_ids for r in trainer.val_set.items]
    assert [r.input_ids for r in no_aug.train_set.items] == [r.input_ids for r in trainer.train_set.items]


def test_prob_zero_trains_exactly_as_without_augmentation(make_config, texts, tmp_path):
    settings = dict(data__train=str(texts), train__epochs=2, train__batch_size=4)
    plain = train(make_config(train__output_dir=str(tmp_path / "plain"), **settings))
    zero = train(make_config(train__output_dir=str(tmp_path / "zero"), data__augment__methods="[noise]",
                             data__augment__prob=0.0, **settings))
    losses = lambda run: [m["train_loss"] for m in metrics(run) if "train_loss" in m]  # noqa: E731
    assert plain.steps == zero.steps and losses(plain.run_dir) == pytest.approx(losses(zero.run_dir), rel=1e-6)
    assert not [m for m in metrics(zero.run_dir) if m.get("event") == "augment"]


def test_augmented_training_logs_each_epoch_and_resumes_identically(make_config, texts, tmp_path):
    settings = dict(data__train=str(texts), data__val_ratio=0.0, train__epochs=3, train__batch_size=4,
                    data__augment__methods="[eda, noise]", data__augment__prob=0.5, data__augment__seed=11)
    straight = train(make_config(train__output_dir=str(tmp_path / "straight"), **settings))
    per_epoch = 6  # 24 examples, batch 4
    assert straight.steps == 3 * per_epoch  # augmentation never changes the number of steps
    events = [m for m in metrics(straight.run_dir) if m.get("event") == "augment"]
    assert [e["epoch"] for e in events] == [0, 1, 2]
    assert all(sum(e["replaced"].values()) > 0 and set(e["replaced"]) <= {"eda", "noise"} for e in events)
    summary = json.loads((straight.run_dir / "summary.json").read_text())
    assert summary["augmented_per_epoch"] == [sum(e["replaced"].values()) for e in events]

    cfg = make_config(train__output_dir=str(tmp_path / "resumed"), **settings)
    with pytest.raises(Interrupted):
        train(cfg, stop_after=per_epoch + 2)  # inside the second epoch
    resumed = train(cfg, resume=True)
    losses = lambda run: [m["train_loss"] for m in metrics(run) if "train_loss" in m]  # noqa: E731
    assert resumed.steps == straight.steps and losses(straight.run_dir) == pytest.approx(losses(resumed.run_dir), rel=1e-5)


def test_methods_that_need_a_model_or_unknown_options_are_refused(make_config):
    with pytest.raises(ConfigError, match="fewtune augment --methods paraphrase") as info:
        make_config(data__augment__methods="[paraphrase]")
    assert "fewtune data mix" in str(info.value)
    with pytest.raises(ConfigError, match="no_such"):
        make_config(data__augment__methods="[eda]", data__augment__options="{eda: {no_such: 1}}")
    with pytest.raises(ConfigError, match="unknown augmentation method 'synonyms'"):
        make_config(data__augment__methods="[synonyms]")
