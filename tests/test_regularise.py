"""Label smoothing, NEFTune, FGM/PGD and EWC (regularise), replay and curriculum (data) on the tiny models."""

import json

import pytest
import torch
import torch.nn.functional as F

from fewtune.train.curriculum import curriculum_order
from fewtune.train.loop import Trainer, collate, train
from fewtune.train.regularise import input_embeddings, neftune_noise
from tests.conftest import write_jsonl


@pytest.fixture
def general_data(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{2 * i}"}]} for i in range(30)]
    return write_jsonl(tmp_path / "general.jsonl", rows)


def _batch(trainer, n=4):
    return collate(trainer.train_set.items[:n], trainer.tokenizer.pad_token_id)


def test_label_smoothing_matches_formula_and_spares_validation(make_config):
    eps = 0.2
    trainer = Trainer(make_config(regularise__label_smoothing=eps, method__name="full", train__lr=1e-5))
    batch = _batch(trainer)
    module = trainer.loss_module
    with torch.no_grad():
        module.train()
        smoothed, weight = module(**batch)
        module.eval()
        plain, _ = module(**batch)
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets, w = batch["input_ids"][:, 1:], batch["loss_weights"][:, 1:]
    nll = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    uniform = -lp.mean(-1)
    expected = (((1 - eps) * nll + eps * uniform) * w).sum()
    assert smoothed.item() == pytest.approx(expected.item(), rel=1e-4)
    assert plain.item() == pytest.approx((nll * w).sum().item(), rel=1e-4)
    assert abs(smoothed.item() - plain.item()) > 1e-2  # (random tiny model: near-uniform, a small gap)


def test_neftune_noise_only_while_training(make_config):
    trainer = Trainer(make_config(regularise__neftune_alpha=5.0))
    emb = input_embeddings(trainer.model)
    ids = _batch(trainer)["input_ids"]
    emb.eval()
    clean = emb(ids)
    assert torch.equal(emb(ids), clean)  # no noise in evaluation/generation
    emb.train()
    noisy = emb(ids)
    bound = 5.0 / (ids.shape[1] * clean.shape[-1]) ** 0.5
    diff = (noisy - clean).abs()
    # a bf16 run keeps the frozen embeddings in bf16: embedding + noise is rounded to bf16 (half a unit in the
    # last place of the sum: its size times 2^-8)
    low = clean.dtype != torch.float32
    slack = noisy.abs().max().item() * 2 ** -8 if low else 1e-7
    assert 0 < diff.max().item() <= bound + slack
    assert diff.mean().item() == pytest.approx(bound / 2, rel=0.1)  # uniform in +-bound
    g = torch.Generator().manual_seed(0)
    assert neftune_noise(clean, 5.0, g).abs().max().item() <= bound * (1 + 2 ** -8 if low else 1) + 1e-7
    train(make_config(regularise__neftune_alpha=5.0, train__max_steps=2))


@pytest.mark.parametrize("kind", ["fgm", "pgd"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_adversarial_step_restores_embeddings_and_adds_gradient(kind, method, make_config):
    settings = dict(method__name=method, regularise__adversarial__kind=kind, regularise__adversarial__epsilon=0.5,
                    regularise__adversarial__alpha=0.2, regularise__adversarial__steps=3)
    trainer = Trainer(make_config(**settings))
    trainer.loss_module.train()
    emb = input_embeddings(trainer.model)
    weight_before = emb.weight.detach().clone()
    batch = _batch(trainer)
    gw = batch["loss_weights"][:, 1:].sum().item()

    def grads_after(adversarial: bool):
        trainer.optimizer.zero_grad(set_to_none=True)
        loss_sum, _ = trainer.loss_module(**batch)
        if adversarial:  # what the training step does at its named points
            trainer._global_weight = gw
            trainer.accelerator.backward(loss_sum / gw)
            trainer.regularisers.after_backward(batch)
        else:
            trainer.accelerator.backward(loss_sum / gw)
        return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    with_adv = grads_after(True)
    assert torch.equal(emb.weight, weight_before)  # bit-identical: the perturbation never touched the weights
    assert trainer.regularisers.hook.delta is None and trainer.regularisers.hook.captured is None
    trainer.regularisers.hook.capture = False  # the same forward/backward without the adversarial part
    clean = grads_after(False)
    trainer.regularisers.hook.capture = True
    assert with_adv.keys() == clean.keys()
    assert any(not torch.allclose(with_adv[n], clean[n]) for n in clean)
    result = train(make_config(train__max_steps=2, **settings))
    assert result.steps == 2


def test_pgd_perturbation_stays_within_epsilon():
    from fewtune.train.regularise import _per_example_unit, _project

    g = torch.randn(3, 5, 8)
    delta = torch.zeros_like(g)
    for _ in range(10):
        delta = _project(delta + 0.4 * _per_example_unit(g), 1.0)
    norms = delta.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.ones(3), atol=1e-5)  # pushed out to, and held at, the epsilon ball


def test_ewc_penalty_zero_at_anchor_positive_away(make_config, general_data):
    trainer = Trainer(make_config(regularise__ewc__weight=100.0, regularise__ewc__general=str(general_data),
                                  regularise__ewc__samples=8))
    ewc = trainer.regularisers.ewc
    assert ewc.penalty().item() == 0.0
    fisher = torch.cat([f.flatten() for f in ewc.fisher.values()])
    assert (fisher >= 0).all() and fisher.sum() > 0
    with torch.no_grad():
        for p in ewc.params.values():
            p.add_(0.01)
    assert ewc.penalty().item() > 0
    run = train(make_config(regularise__ewc__weight=100.0, regularise__ewc__general=str(general_data),
                            regularise__ewc__samples=8, train__max_steps=2))
    assert run.steps == 2


def test_ewc_needs_general_data(make_config):
    from fewtune.config import ConfigError

    with pytest.raises(ConfigError, match="regularise.ewc.general"):
        make_config(regularise__ewc__weight=1.0)


def test_replay_mixes_general_examples_into_training_only(make_config, general_data, tmp_path):
    plain = Trainer(make_config())
    assert plain.curriculum is None  # (order: none, the default)
    mixed = Trainer(make_config(data__replay__general=str(general_data), data__replay__ratio=0.5))
    n = len(plain.train_set.items)
    assert len(mixed.train_set.items) == n + round(0.5 * n)
    assert len(mixed.val_set.items) == len(plain.val_set.items)
    rows = [json.loads(l) for l in (mixed.run_dir / "replay_mix.jsonl").read_text().splitlines()]
    assert sum(r["provenance"]["set"] == "general" for r in rows) == round(0.5 * n)
    texts = {plain.tokenizer.decode(r.input_ids) for r in mixed.train_set.items}
    assert sum("plus" in t for t in texts) == round(0.5 * n)


def test_curriculum_order_easy_to_hard_shuffled_within_buckets():
    difficulty = [float(x) for x in [9, 1, 7, 3, 5, 2, 8, 4, 6, 0, 11, 10]]
    order = curriculum_order(difficulty, buckets=3, seed=1, epoch=0)
    assert sorted(order) == list(range(12))
    groups = [[difficulty[i] for i in order[k:k + 4]] for k in (0, 4, 8)]
    assert [sorted(g) for g in groups] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    orders = {tuple(curriculum_order(difficulty, 3, seed=1, epoch=e)) for e in range(6)}
    assert len(orders) > 1  # shuffled within buckets, differently each epoch
    assert curriculum_order(difficulty, 12, seed=1, epoch=0) == sorted(range(12), key=lambda i: difficulty[i])


@pytest.mark.parametrize("order", ["length", "loss"])
def test_trainer_uses_curriculum_in_first_epoch_only(order, make_config):
    trainer = Trainer(make_config(data__curriculum__order=order, data__curriculum__buckets=2,
                                  train__batch_size=4))
    difficulty = trainer.curriculum.difficulty
    if order == "length":
        assert difficulty == [float(len(r)) for r in trainer.train_set.items]
    else:
        batch = collate([trainer.train_set.items[0]], trainer.tokenizer.pad_token_id)
        trainer.loss_module.eval()
        with torch.no_grad():
            s, w = trainer.loss_module(**batch)
        assert difficulty[0] == pytest.approx((s / w).item(), rel=1e-5)
    batches = trainer.curriculum.batch_order(0)
    assert trainer.epoch_order(0) == batches  # the loop's first epoch
    flat = [i for b in batches for i in b]
    half = len(flat) // 2
    assert max(difficulty[i] for i in flat[:half]) <= min(difficulty[i] for i in flat[half:])
    assert trainer.curriculum.batch_order(1) is None  # later epochs: the usual shuffled batches
    result = trainer.fit()
    assert result.steps > 0
