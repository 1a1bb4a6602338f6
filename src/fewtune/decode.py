"""fewtune's own decoding loop: the same tokens as ``model.generate``, less work on a CPU.

``model.generate`` keeps every row of a batch in every step until the last row finishes, and
runs each prompt's tokens in full. Three things are cheaper here:

1. the token prefix that every prompt of the call shares (a system prompt and the chat markup,
   often most of a short prompt) runs once, and its key/value cache is expanded over each batch;
2. a row that finished (end-of-sequence token, a stop string, or its length limit) leaves the
   batch at once: its rows of the cache are dropped, so later steps run on the rows still going;
3. prompts are batched by length (the caller sorts them), so little padding is run.

Greedy decoding gives the tokens ``model.generate`` gives (up to float rounding of the separate
prefix pass: an argmax that two logits tie within rounding can go either way). Sampling uses
transformers' own logits processors (repetition penalty, temperature, top-k, top-p) and
``torch.multinomial``, so it is seeded like the rest of fewtune but draws differently from
``model.generate``.

Models this loop does not cover run through ``model.generate`` (:func:`supported`): prompt-learning
adapters (their virtual tokens are inserted by peft's own generate), and attention with a sliding
window (a cache built from the shared prefix would not carry the window).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def supported(model) -> bool:
    """Whether :func:`decode` can run ``model`` (else the caller uses ``model.generate``)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "vision_config", None) is not None:  # M-RoPE positions and image inputs: model.generate
        return False
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False
    layer_types = getattr(config, "layer_types", None) or []
    if any("sliding" in str(t) for t in layer_types):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) and not layer_types:
        return False
    return True


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least one token of its own."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
        if n <= 0:
            return 0
    return max(n, 0)


_CACHE_ARG: dict[type, str] = {}


def cache_arg(model) -> str:
    """The forward keyword that takes a key/value cache: ``cache`` in recent transformers (5.x renamed it; the
    old ``past_key_values`` still works with a deprecation warning until 5.40), ``past_key_values`` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model takes **kwargs
    kind = type(base)
    if kind not in _CACHE_ARG:
        params = inspect.signature(base.forward).parameters
        _CACHE_ARG[kind] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_ARG[kind]


def output_cache(out):
    """The cache a forward with ``use_cache=True`` returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def prefix_cache(model, prefix: Sequence[int]):
    """The key/value tensors of ``prefix`` (one row), per layer; None for an empty prefix."""
    if not prefix:
        return None
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in output_cache(out).layers]


def _processors(temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float):
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList()
    if repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature > 0:
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_k:
            procs.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
    return procs


@torch.no_grad()
def decode(model, prompts: Sequence[Sequence[int]], prefix_layers, n_prefix: int, *, max_new_tokens: int,
           eos_ids: Sequence[int], pad_id: int, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, repetition_penalty: float = 1.0, num_return_sequences: int = 1,
           stop: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
           on_step: Callable[[list[int], list[int]], None] | None = None) -> list[list[int]]:
    """New tokens for each prompt of one batch (``num_return_sequences`` rows per prompt, in order), each up
    to and including the token that ended it. ``prompts`` are whole prompts; their first ``n_prefix`` tokens
    are the shared prefix whose cache ``prefix_layers`` holds (:func:`prefix_cache`). ``stop(seqs, width)``
    says which rows a stop string ended (seqs: the rows' tokens, the new ones from column ``width``).
    ``on_step(rows, tokens)``, if given, receives after every step the rows still running (their index in the
    output) and the token each just got: what a streaming server sends on."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    rows = [list(p[n_prefix:]) for p in prompts for _ in range(num_return_sequences)]
    b = len(rows)
    width = max(len(r) for r in rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    own = torch.zeros((b, width), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding inside the rows' own part: every prompt ends at the same column
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        own[i, width - len(r):] = 1
    mask = torch.cat([torch.ones((b, n_prefix), dtype=torch.long), own], dim=1)
    position = (n_prefix + own.cumsum(1) - 1).clamp(min=0)
    cache = None
    if prefix_layers is not None:
        cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
                                             for k, v in prefix_layers])
    # what processors and stop checks read: the whole prompt (prefix included) and the new tokens
    prefix = torch.tensor(list(prompts[0][:n_prefix]), dtype=torch.long).expand(b, n_prefix)
    seqs = torch.cat([prefix, ids], dim=1)
    seq_width = seqs.shape[1]
    procs = _processors(temperature, top_k, top_p, repetition_penalty)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long)
    alive = torch.arange(b)  # original row of each row still in the batch
    new: list[list[int]] = [[] for _ in range(b)]
    step_ids, step_pos = ids, position
    name = cache_arg(model)
    for step in range(max_new_tokens):
        out = model(input_ids=step_ids.to(device), attention_mask=mask.to(device), position_ids=step_pos.to(device),
                    use_cache=True, logits_to_keep=1, **{name: cache})
        cache = output_cache(out)
        scores = out.logits[:, -1, :].float().cpu()
        scores = procs(seqs, scores) if len(procs) else scores
        if temperature > 0:
            token = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)
        else:
            token = scores.argmax(dim=-1)
        seqs = torch.cat([seqs, token.unsqueeze(1)], dim=1)
        rows_now, tokens_now = alive.tolist(), token.tolist()
        for row, t in zip(rows_now, tokens_now):
            new[row].append(t)
        if on_step is not None:
            on_step(rows_now, tokens_now)
        done = torch.isin(token, eos)
        if stop is not None:
            done |= stop(seqs, seq_width)
        if step == max_new_tokens - 1:
            break
        if done.any():
            keep = torch.nonzero(~done).flatten()
            if keep.numel() == 0:
                break
            cache.batch_select_indices(keep.to(device))
            alive, seqs, mask, token = alive[keep], seqs[keep], mask[keep], token[keep]
            step_pos = step_pos[keep]
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=torch.long)], dim=1)
        step_pos = step_pos[:, -1:] + 1
        step_ids = token.unsqueeze(1)
    return new
