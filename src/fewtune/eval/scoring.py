"""Log-likelihood scoring: candidate labels given a prompt (choice scoring) and perplexity.

Choice scoring asks, for every example and every candidate label, how likely the model
finds the label's tokens after the prompt, exactly as training renders them: the prompt
is ``render_conversation(..., for_generation=True)`` and the label continuation is what
``render_conversation`` appends for an assistant turn with that label (the label and the
end-of-turn marker: the tokens training puts loss on, up to the end-of-sequence token).

Work is shared three ways, because on a CPU the cost is the number of token positions run:

1. the prefix all prompts of the set share (typically the system prompt and the chat
   markup) runs once for the whole set and its key/value cache is reused;
2. each example's remaining prompt tokens run once per batch of examples;
3. the label continuations run for every (example, label) row on that example's cache.

Only the positions that predict label tokens are projected to the vocabulary, and only
per-example sums leave a batch, so memory does not grow with the size of the set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fewtune.data.formats import Message
from fewtune.data.render import RenderError, Template, render_conversation


@dataclass
class ChoiceScore:
    """One example's scores: per label, the summed log-probability of its continuation and its token count."""

    logprobs: list[float]
    n_tokens: list[int]

    def best(self, normalize: bool = False) -> int:
        values = [lp / n for lp, n in zip(self.logprobs, self.n_tokens)] if normalize else self.logprobs
        return max(range(len(values)), key=values.__getitem__)


def label_continuation(conversation: Sequence[Message], label: str, tokenizer, template: Template,
                       prompt: list[int] | None = None) -> list[int]:
    """The tokens training appends after the prompt for an assistant turn saying ``label``, up to and
    including the end-of-sequence token: what the template adds after it (ChatML's newline) follows
    whatever the answer was, so it is not scored."""
    prompt = prompt if prompt is not None else render_conversation(
        list(conversation), tokenizer, template, for_generation=True).input_ids
    full = render_conversation(list(conversation) + [Message("assistant", label)], tokenizer, template).input_ids
    if full[:len(prompt)] != prompt or len(full) <= len(prompt):
        raise RenderError(f"the rendered conversation with label {label!r} does not extend the generation prompt; "
                          "choice scoring needs a prefix-consistent template")
    continuation = full[len(prompt):]
    eos = tokenizer.eos_token_id
    if eos is not None and eos in continuation[1:]:
        continuation = continuation[:continuation.index(eos, 1) + 1]
    return continuation


class _Continuations:
    """Label continuations, rendered once per prompt shape and checked on a spread of examples.

    For the usual templates an assistant turn renders the same whatever precedes it, so the
    continuation of a label is rendered for the first example of each role pattern and
    verified on up to ``checks`` further examples; if any differs, every (example, label)
    pair is rendered on its own.
    """

    def __init__(self, tokenizer, template: Template, labels: Sequence[str], n_examples: int, checks: int = 16):
        self.tokenizer, self.template, self.labels = tokenizer, template, list(labels)
        self.cache: dict[tuple, list[list[int]]] = {}
        self.check_every = max(1, n_examples // checks)
        self.exact = False  # True once a check failed: render everything

    def __call__(self, index: int, conversation: Sequence[Message], prompt: list[int]) -> list[list[int]]:
        def render() -> list[list[int]]:
            return [label_continuation(conversation, lab, self.tokenizer, self.template, prompt) for lab in self.labels]

        if self.exact:
            return render()
        key = tuple(m.role for m in conversation)
        if key not in self.cache:
            self.cache[key] = render()
        elif index % self.check_every == 0:
            if render() != self.cache[key]:
                self.exact = True
                return render()
        return self.cache[key]


def _common_prefix(prompts: Sequence[list[int]]) -> int:
    """Length of the token prefix all prompts share, leaving every prompt at least one own token."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return max(n, 0)


def _cache_from(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers)


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


@torch.no_grad()
def choice_scores(model, tokenizer, template: Template, conversations: Sequence[Sequence[Message]],
                  labels: Sequence[str], batch_size: int = 8, max_rows: int = 64,
                  progress: bool = True) -> Iterator[ChoiceScore]:
    """Yield, in order, each conversation's :class:`ChoiceScore` over ``labels``.

    ``conversations`` are prompts (a final assistant turn, if any, is dropped by the render).
    ``batch_size`` examples share one forward of their prompts; their label rows run in
    chunks of at most ``max_rows``.
    """
    if not labels:
        raise ValueError("choice scoring needs at least one candidate label")
    if not conversations:
        return
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [render_conversation(list(c), tokenizer, template, for_generation=True).input_ids for c in conversations]
    continuations = _Continuations(tokenizer, template, labels, len(conversations))
    n_prefix = _common_prefix(prompts)
    prefix_layers = None
    if n_prefix:
        out = model(input_ids=torch.tensor([prompts[0][:n_prefix]], device=device), use_cache=True, logits_to_keep=1)
        prefix_layers = _cache_layers(out.past_key_values)
    bar = tqdm(total=len(conversations), desc="choice scoring", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(conversations), batch_size):
        idx = list(range(start, min(start + batch_size, len(conversations))))
        suffixes = [prompts[i][n_prefix:] for i in idx]
        ids, mask = _pad(suffixes, pad_id)
        b, width = ids.shape
        lengths = mask.sum(1)
        position = n_prefix + torch.arange(width).expand(b, width)
        cache = None
        if prefix_layers is not None:
            cache = _cache_from([(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix_layers])
            mask = torch.cat([torch.ones((b, n_prefix), dtype=torch.long), mask], dim=1)
        last = lengths - 1
        keep = torch.unique(last)  # logits only where a prompt ends: they predict the first label token
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position.to(device),
                    past_key_values=cache, use_cache=True, logits_to_keep=keep.to(device))
        first_logp = F.log_softmax(out.logits.float(), dim=-1)  # [b, len(keep), vocab]
        where = torch.searchsorted(keep, last)
        first_logp = first_logp[torch.arange(b), where]  # [b, vocab]
        example_layers = _cache_layers(out.past_key_values)
        del out
        conts = [continuations(i, conversations[i], prompts[i]) for i in idx]
        rows = [(r, j) for r in range(b) for j in range(len(labels))]
        sums = torch.zeros((b, len(labels)), dtype=torch.float64)
        counts = torch.zeros((b, len(labels)), dtype=torch.long)
        for chunk_start in range(0, len(rows), max_rows):
            chunk = rows[chunk_start:chunk_start + max_rows]
            seqs = [conts[r][j] for r, j in chunk]
            owner = torch.tensor([r for r, _ in chunk])
            first = torch.tensor([s[0] for s in seqs])
            sums[owner, [j for _, j in chunk]] += first_logp[owner, first].double().cpu()
            counts[owner, [j for _, j in chunk]] += 1
            longest = max(len(s) for s in seqs)
            if longest < 2:
                continue
            lab_ids, lab_mask = _pad([s[:-1] for s in seqs], pad_id)  # inputs: all but the last label token
            targets, target_mask = _pad([s[1:] for s in seqs], pad_id)
            n, lw = lab_ids.shape
            cache = _cache_from([(k.index_select(0, owner.to(k.device)), v.index_select(0, owner.to(v.device)))
                                 for k, v in example_layers])
            full_mask = torch.cat([torch.ones((n, n_prefix), dtype=torch.long), mask[owner, n_prefix:], lab_mask], dim=1)
            position = (n_prefix + lengths[owner]).unsqueeze(1) + torch.arange(lw).unsqueeze(0)
            logits = model(input_ids=lab_ids.to(device), attention_mask=full_mask.to(device),
                           position_ids=position.to(device), past_key_values=cache, use_cache=True).logits
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.to(device).unsqueeze(-1)).squeeze(-1)
            logp = (logp * target_mask.to(device)).sum(1).double().cpu()
            sums.index_put_((owner, torch.tensor([j for _, j in chunk])), logp, accumulate=True)
            counts.index_put_((owner, torch.tensor([j for _, j in chunk])), target_mask.sum(1), accumulate=True)
            del logits, cache
        for r in range(b):
            yield ChoiceScore(sums[r].tolist(), counts[r].tolist())
        bar.update(b)
    bar.close()


# ---------------------------------------------------------------- perplexity


@dataclass
class NLL:
    """Summed negative log-likelihood (nats) of one text window or conversation, and its token count."""

    nll: float
    tokens: float


@torch.no_grad()
def sequence_nll(model, items: Sequence[tuple[list[int], list[float]]], batch_size: int = 4,
                 progress: bool = True, desc: str = "perplexity") -> Iterator[NLL]:
    """Yield weighted next-token NLL per (input_ids, loss_weights) item; weight 0 positions do not count.

    The weight of token t scores the prediction of token t from the tokens before it (the
    first token of an item is never scored), as in training.
    """
    device = next(model.parameters()).device
    bar = tqdm(total=len(items), desc=desc, disable=not progress, dynamic_ncols=True)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        ids, mask = _pad([ids for ids, _ in chunk], 0)
        weights = torch.zeros(ids.shape, dtype=torch.float32)
        for i, (_, w) in enumerate(chunk):
            weights[i, :len(w)] = torch.tensor(w, dtype=torch.float32)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
        ce = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:].to(device), reduction="none").cpu()
        del logits
        w = weights[:, 1:] * mask[:, 1:]
        for i in range(len(chunk)):
            yield NLL(float((ce[i] * w[i]).sum()), float(w[i].sum()))
        bar.update(len(chunk))
    bar.close()


def text_windows(text: str, tokenizer, window: int) -> list[tuple[list[int], list[float]]]:
    """Plain text cut into consecutive windows of ``window`` tokens (each window's first token is context)."""
    if window < 2:
        raise ValueError("the perplexity window must be at least 2 tokens")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = []
    step = window - len(bos)
    for start in range(0, len(ids), step):
        piece = bos + ids[start:start + step]
        if len(piece) >= 2:
            out.append((piece, [0.0] * len(bos) + [1.0] * (len(piece) - len(bos))))
    return out
