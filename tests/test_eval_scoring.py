"""Choice scoring and perplexity on tiny random models, checked against plain forward passes."""

import gc
import math

import pytest
import torch

from fewtune.data.formats import Example, Message
from fewtune.data.render import Template, render_conversation
from fewtune.eval.evaluate import classify
from fewtune.eval.scoring import choice_scores, label_continuation, sequence_nll, text_windows
from fewtune.generate import load_for_inference

LABELS = ["yes", "no", "maybe so", "正面"]


def _by_hand(model, tokenizer, template, conversation, label):
    """Summed log-probability of the label's continuation from one plain forward pass of prompt + continuation."""
    prompt = render_conversation(conversation, tokenizer, template, for_generation=True).input_ids
    full = render_conversation(conversation + [Message("assistant", label)], tokenizer, template).input_ids
    assert full[:len(prompt)] == prompt
    continuation = full[len(prompt):]
    if tokenizer.eos_token_id in continuation:  # scored up to and including the end of the turn
        continuation = continuation[:continuation.index(tokenizer.eos_token_id) + 1]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + continuation])).logits[0].float(), dim=-1)
    return sum(logp[len(prompt) - 1 + k, tok].item() for k, tok in enumerate(continuation)), len(continuation)


@pytest.mark.parametrize("arch,kind", [("llama", "chat"), ("qwen2", "chat"), ("llama", "plain")])
def test_choice_scores_equal_plain_forward_and_argmax_wins(tiny_models, arch, kind):
    loaded = load_for_inference(tiny_models[arch], template_kind=kind, system_prompt="Answer yes, no, maybe so or 正面.",
                                precision="no")  # the exact-arithmetic property: fp32 whatever forces auto
    model, tok, template = loaded.model, loaded.tokenizer, loaded.template
    # different prompt lengths: padding inside a batch, a shared prefix, labels of 1 to 5 tokens
    conversations = [[Message("user", f"question {i} " + "word " * (i % 5))] for i in range(7)]
    scores = list(choice_scores(model, tok, template, conversations, LABELS, batch_size=3, progress=False))
    assert len(scores) == len(conversations)
    for conv, score in zip(conversations, scores):
        hand = [_by_hand(model, tok, template, conv, lab) for lab in LABELS]
        assert score.logprobs == pytest.approx([h[0] for h in hand], abs=2e-3)
        assert score.n_tokens == [h[1] for h in hand]
        best = max(range(len(LABELS)), key=lambda j: hand[j][0])
        assert score.best() == best
        norm_best = max(range(len(LABELS)), key=lambda j: hand[j][0] / hand[j][1])
        assert score.best(normalize=True) == norm_best


@pytest.mark.parametrize("normalize", [False, True])
def test_pruned_scoring_keeps_the_winner_and_bounds_the_rest(tiny_models, normalize):
    """prune=True: exact scores where computed, an upper bound below the winner elsewhere, the same argmax."""
    loaded = load_for_inference(tiny_models["llama"], system_prompt="Answer yes, no, maybe so or 正面.")
    model, tok, template = loaded.model, loaded.tokenizer, loaded.template
    conversations = [[Message("user", f"question {i} " + "word " * (i % 5))] for i in range(7)]
    full = list(choice_scores(model, tok, template, conversations, LABELS, batch_size=3, progress=False))
    pruned = list(choice_scores(model, tok, template, conversations, LABELS, batch_size=3, progress=False,
                                prune=True, normalize=normalize))
    for conv, f, p in zip(conversations, full, pruned):
        assert p.best(normalize) == f.best(normalize)
        assert p.n_tokens == f.n_tokens and p.exact[p.best(normalize)]
        win = f.logprobs[f.best(normalize)] / (f.n_tokens[f.best(normalize)] if normalize else 1)
        for j, label in enumerate(LABELS):
            if p.exact[j]:
                assert p.logprobs[j] == pytest.approx(f.logprobs[j], abs=1e-4)
            else:  # the first token's log-probability: at least the full score, and (scaled) below the winner
                first = _by_hand(model, tok, template, conv, label)  # full score; the bound must not be below it
                assert p.logprobs[j] >= first[0] - 1e-4
                assert p.logprobs[j] / (p.n_tokens[j] if normalize else 1) < win


def test_label_continuation_is_what_training_renders(tokenizer):
    template = Template.for_tokenizer(tokenizer)
    conv = [Message("user", "play some jazz")]
    cont = label_continuation(conv, "PlayMusic", tokenizer, template)
    # ChatML: the label, then <|im_end|>; the template's newline after it is not scored
    assert tokenizer.decode(cont) == "PlayMusic<|im_end|>"
    full = render_conversation(conv + [Message("assistant", "PlayMusic")], tokenizer, template)
    prompt = render_conversation(conv, tokenizer, template, for_generation=True).input_ids
    assert full.input_ids[len(prompt):len(prompt) + len(cont)] == cont
    assert all(w == 1.0 for w in full.loss_weights[len(prompt):len(prompt) + len(cont)])  # training's targets


def test_classify_predicts_the_highest_likelihood_label(tiny_model):
    loaded = load_for_inference(tiny_model)
    examples = [Example([Message("user", f"text {i}"), Message("assistant", LABELS[i % 2])], "mem", i + 1,
                        label=LABELS[i % 2]) for i in range(6)]
    metrics, records = classify(loaded, examples, LABELS, batch_size=4, progress=False)
    for r, e in zip(records, examples):
        hand = {lab: _by_hand(loaded.model, loaded.tokenizer, loaded.template, e.prompt_messages, lab)[0] for lab in LABELS}
        assert r["predicted"] == max(hand, key=hand.get)
        assert r["correct"] == (r["predicted"] == e.label)
    assert metrics["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 6)


def test_perplexity_equals_plain_cross_entropy(tiny_model):
    loaded = load_for_inference(tiny_model)
    text = "The quick brown fox jumps over the lazy dog. 我爱北京天安门。" * 6
    items = text_windows(text, loaded.tokenizer, window=32)
    assert len(items) > 2 and all(len(ids) <= 32 for ids, _ in items)
    got = list(sequence_nll(loaded.model, items, batch_size=3, progress=False))
    for (ids, weights), s in zip(items, got):
        with torch.no_grad():
            logits = loaded.model(torch.tensor([ids])).logits[0, :-1].float()
        ce = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        w = torch.tensor(weights[1:])
        assert s.nll == pytest.approx(float((ce * w).sum()), rel=1e-4)
        assert s.tokens == float(w.sum())
    total = sum(s.nll for s in got) / sum(s.tokens for s in got)
    assert math.isfinite(total) and total > 0


def _live_tensor_bytes(exclude: set[int]) -> int:
    total = 0
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and id(obj) not in exclude:
            total += obj.numel() * obj.element_size()
    return total


def test_choice_scoring_memory_does_not_grow_with_the_set(tiny_model):
    """320 examples: live tensors stay at one batch's worth, and nothing per example is a tensor."""
    loaded = load_for_inference(tiny_model)
    params = {id(p) for p in loaded.model.parameters()} | {id(b) for b in loaded.model.buffers()}
    conversations = [[Message("user", f"example number {i} " + "x " * (i % 7))] for i in range(320)]
    samples: list[int] = []
    kept = []
    for i, score in enumerate(choice_scores(loaded.model, loaded.tokenizer, loaded.template, conversations, LABELS,
                                            batch_size=8, progress=False)):
        assert all(isinstance(x, float) for x in score.logprobs)
        kept.append(score)
        if i % 64 == 7:  # the last example of every eighth batch: the generator is paused mid-set
            samples.append(_live_tensor_bytes(params))
    assert len(kept) == 320 and len(samples) == 5
    one_logits_row = len(loaded.tokenizer) * 4  # what keeping a single example's logits would cost
    # after ~300 examples the live tensors are no larger than after the first batch, give or take one row
    assert max(samples) <= samples[0] + one_logits_row, samples


@pytest.mark.slow
def test_choice_scoring_on_the_real_model_matches_a_plain_forward():
    """The default model (GGUF-converted SmolLM2): shared-prefix, packed-label scores equal a plain forward."""
    from fewtune.models import DEFAULT_MODEL

    loaded = load_for_inference(DEFAULT_MODEL, system_prompt="Classify the request: PlayMusic, GetWeather or RateBook.",
                                precision="no")  # compared with a plain fp32 forward
    labels = ["PlayMusic", "GetWeather", "RateBook"]
    conversations = [[Message("user", "play some jazz by miles davis")], [Message("user", "will it rain in Oslo")],
                     [Message("user", "give this novel four stars")]]
    scores = list(choice_scores(loaded.model, loaded.tokenizer, loaded.template, conversations, labels,
                                batch_size=2, progress=False))
    for conv, score in zip(conversations, scores):
        hand = [_by_hand(loaded.model, loaded.tokenizer, loaded.template, conv, lab)[0] for lab in labels]
        assert score.logprobs == pytest.approx(hand, abs=1e-2)
    # pruning: the trained-looking confident answers leave the other labels at their first-token bound
    pruned = list(choice_scores(loaded.model, loaded.tokenizer, loaded.template, conversations, labels,
                                batch_size=2, progress=False, prune=True))
    assert [p.best() for p in pruned] == [s.best() for s in scores]
    for p, s in zip(pruned, scores):  # what was scored (on a subset of the batch's cache rows) is exact
        assert [a for a, e in zip(p.logprobs, p.exact) if e] == pytest.approx(
            [b for b, e in zip(s.logprobs, p.exact) if e], abs=1e-3)
    assert sum(not e for p in pruned for e in p.exact) >= 1, [p.exact for p in pruned]


@pytest.mark.parametrize("min_saving,label_passes", [(2.0, [2, 1, 1]), (-1.0, [2, 2, 2])])
def test_pruning_drops_its_second_pass_when_it_saves_too_little(tiny_models, monkeypatch, min_saving, label_passes):
    """Batches of 3: the first always scores its labels in two passes; later ones in one pass (every label still
    open under the first-token bounds) when the passes saved less than MIN_SAVING of the label positions. The winners
    are the same either way."""
    from fewtune.decode import cache_arg
    from fewtune.eval import scoring

    monkeypatch.setattr(scoring, "CPU_SCORING_MAX", 1)  # batches of the requested 3
    monkeypatch.setattr(scoring._PruneTally, "MIN_SAVING", min_saving)
    loaded = load_for_inference(tiny_models["llama"], system_prompt="Answer yes, no, maybe so or 正面.", precision="no")
    model, tok, template = loaded.model, loaded.tokenizer, loaded.template
    conversations = [[Message("user", f"question {i} " + "word " * (i % 5))] for i in range(9)]
    full = list(choice_scores(model, tok, template, conversations, LABELS, batch_size=3, progress=False))
    calls = []  # per forward on a cache: True for a batch's prompt pass (it keeps the last column's logits only)
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: calls.append(kw.get("logits_to_keep") == 1) if kw.get(cache_arg(model)) else None,
        with_kwargs=True)
    pruned = list(choice_scores(model, tok, template, conversations, LABELS, batch_size=3, progress=False, prune=True))
    hook.remove()
    passes = []
    for prompt_pass in calls:
        if prompt_pass:
            passes.append(0)
        else:
            passes[-1] += 1
    assert passes == label_passes
    for f, p in zip(full, pruned):
        assert p.best() == f.best()
        for j in range(len(LABELS)):
            if p.exact[j]:
                assert p.logprobs[j] == pytest.approx(f.logprobs[j], abs=1e-4)
