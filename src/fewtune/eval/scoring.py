"""Log-likelihood scoring: candidate labels given a prompt (choice scoring) and perplexity.

Choice scoring asks, for every example and every candidate label, how likely the model
finds the label's tokens after the prompt, exactly as training renders them: the prompt
is ``render_conversation(..., for_generation=True)`` and the label continuation is what
``render_conversation`` appends for an assistant turn with that label (the label and the
end-of-turn marker: the tokens training puts loss on, up to the end-of-sequence token).

Work is shared three ways, because on a CPU the cost is the number of token positions run:

1. the prefix all prompts of the set share (typically the system prompt and the chat
   markup) runs once for the whole set and its key/value cache is reused;
2. each example's remaining prompt tokens run once, a batch of examples at a time;
3. all label continuations of an example run as one packed row on that example's cache,
   each label seeing the prompt and its own earlier tokens only (a block-diagonal mask),
   so nothing is copied per label.

Only the positions that predict label tokens reach the vocabulary projection, and only
per-example sums leave a batch, so memory does not grow with the size of the set.

When only the winner matters (accuracy, F1), ``prune=True`` skips labels that provably
cannot win: every token's log-probability is at most 0, so a label's score is at most the
log-probability of its first token (divided by its length when normalising), which the
prompt's last position gives for free. The most promising label of each example is scored
in full first; any label whose bound is below the best full score is then left out. The
argmax is the same as without pruning; the skipped labels report their bound and are
marked in :attr:`ChoiceScore.exact`.

The second pass costs a forward of its own (on a CPU about a tenth of the batch's time). A
model that spreads its probability over the labels (a base model before fine-tuning) leaves
almost every label open after the first, so scoring labels in two passes is slower than in
one: SNIPS's 700 utterances with the base model, bf16, 10.6 s in two passes against 9.5 s
exactly. So :class:`_PruneTally` watches what two passes save on the batches that use them and
runs one pass (every label still open under the first-token bounds) while they save less
than a quarter of the label positions, trying two passes again every few batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fewtune.data.formats import Message
from fewtune.decode import cache_arg, common_prefix, output_cache, prefix_cache
from fewtune.data.render import RenderError, Template, render_conversation


@dataclass
class ChoiceScore:
    """One example's scores: per label, the summed log-probability of its continuation and its token count."""

    logprobs: list[float]
    n_tokens: list[int]
    exact: list[bool] | None = None  # False where pruning left a label at its upper bound (None: all exact)

    def best(self, normalize: bool = False) -> int:
        values = self._values(normalize)
        return max(range(len(values)), key=values.__getitem__)

    def probabilities(self, normalize: bool = False) -> list[float]:
        """Each label's probability among the candidates: the softmax over the summed (``normalize``: per-token
        mean) log-probabilities. Meaningful where every label was scored exactly."""
        values = self._values(normalize)
        top = max(values)
        exps = [math.exp(v - top) for v in values]
        total = sum(exps)
        return [e / total for e in exps]

    def _values(self, normalize: bool) -> list[float]:
        return [lp / n for lp, n in zip(self.logprobs, self.n_tokens)] if normalize else list(self.logprobs)


def label_continuation(conversation: Sequence[Message], label: str, tokenizer, template: Template,
                       prompt: list[int] | None = None, vision=None) -> list[int]:
    """The tokens training appends after the prompt for an assistant turn saying ``label``, up to and
    including the end-of-sequence token: what the template adds after it (ChatML's newline) follows
    whatever the answer was, so it is not scored."""
    prompt = prompt if prompt is not None else render_conversation(
        list(conversation), tokenizer, template, for_generation=True, vision=vision).input_ids
    full = render_conversation(list(conversation) + [Message("assistant", label)], tokenizer, template,
                               vision=vision).input_ids
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


def _pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def _label_rows(conts: list[list[list[int]]], seen: torch.Tensor, dtype: torch.dtype):
    """All labels of an example packed into one row: inputs, targets, positions and a 4D additive mask.

    Label j contributes its continuation minus the last token as inputs (its first token is
    predicted by the prompt). Each label's tokens see the example's prompt (``seen``: 1 where
    the cache holds a real token) and the earlier tokens of the same label only.
    """
    b, cached = seen.shape
    widths = [sum(len(c) - 1 for c in row) for row in conts]
    width = max(1, max(widths))
    ids = torch.zeros((b, width), dtype=torch.long)
    targets = torch.zeros((b, width), dtype=torch.long)
    offset = torch.zeros((b, width), dtype=torch.long)  # position within the label
    owner = torch.full((b, width), -1, dtype=torch.long)  # which label a column belongs to (-1: padding)
    allowed = torch.zeros((b, width, cached + width), dtype=torch.bool)
    allowed[:, :, :cached] = seen.bool().unsqueeze(1)
    for r, row in enumerate(conts):
        col = 0
        for j, c in enumerate(row):
            n = len(c) - 1
            if n <= 0:
                continue
            ids[r, col:col + n] = torch.tensor(c[:-1])
            targets[r, col:col + n] = torch.tensor(c[1:])
            offset[r, col:col + n] = torch.arange(n)
            owner[r, col:col + n] = j
            allowed[r, col:col + n, cached + col:cached + col + n] = torch.ones((n, n), dtype=torch.bool).tril()
            col += n
    allowed[:, :, 0] |= owner < 0  # padding columns look at the first token, so no row is empty
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)
    return ids, targets, offset, owner, mask


@dataclass
class _PruneTally:
    """Label positions (padding included) that two-pass pruning ran, against those one pass would have run."""

    open_positions: int = 0
    run_positions: int = 0
    batches: int = 0
    MIN_SAVING = 0.25
    PROBE_EVERY = 8

    def two_passes(self) -> bool:
        self.batches += 1
        if self.open_positions == 0 or (self.batches - 1) % self.PROBE_EVERY == 0:
            return True
        return self.run_positions < (1 - self.MIN_SAVING) * self.open_positions


@torch.no_grad()
def choice_scores(model, tokenizer, template: Template, conversations: Sequence[Sequence[Message]],
                  labels: Sequence[str], batch_size: int = 8, progress: bool = True, prune: bool = False,
                  normalize: bool = False) -> Iterator[ChoiceScore]:
    """Yield, in order, each conversation's :class:`ChoiceScore` over ``labels``.

    ``conversations`` are prompts (a final assistant turn, if any, is dropped by the render).
    ``batch_size`` examples (on a CPU more, as memory allows: :func:`cpu_batch`) run together: one forward of their own prompt tokens on the
    shared prefix's cache, then one forward of all their labels, packed one row per example
    on that cache. Examples are grouped by prompt length within windows of 16 batches (less
    padding); results still come out in the input order. ``prune`` skips labels that cannot
    beat the best one under ``best(normalize)`` (see the module notes): same winners, fewer
    positions run; without it every label is scored exactly.
    """
    if not labels:
        raise ValueError("choice scoring needs at least one candidate label")
    if not conversations:
        return
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [render_conversation(list(c), tokenizer, template, for_generation=True).input_ids for c in conversations]
    continuations = _Continuations(tokenizer, template, labels, len(conversations))
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        # prefix, prompt and P-tuning: peft puts the virtual tokens (or the prefix) into every forward, so neither
        # the shared-prefix cache nor the label pass on a cache applies; each example's labels run whole
        for i, conversation in enumerate(tqdm(conversations, desc="choice scoring", disable=not progress,
                                              dynamic_ncols=True)):
            yield _score_whole(model, prompts[i], continuations(i, conversation, prompts[i]), pad_id, device)
        return
    n_prefix = common_prefix(prompts)
    prefix_layers = prefix_cache(model, prompts[0][:n_prefix])
    batch_size = cpu_batch(model, batch_size, prompts, n_prefix, [len(c) for c in continuations(0, conversations[0],
                                                                                                prompts[0])])
    bar = tqdm(total=len(conversations), desc="choice scoring", disable=not progress, dynamic_ncols=True)
    window = batch_size * 16
    tally = _PruneTally() if prune else None
    for w_start in range(0, len(conversations), window):
        in_window = range(w_start, min(w_start + window, len(conversations)))
        order = sorted(in_window, key=lambda i: len(prompts[i]))
        done: dict[int, ChoiceScore] = {}
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            for i, score in zip(idx, _score_batch(model, [prompts[i][n_prefix:] for i in idx],
                                                  [continuations(i, conversations[i], prompts[i]) for i in idx],
                                                  prefix_layers, n_prefix, pad_id, device, dtype, prune,
                                                  normalize, tally)):
                done[i] = score
            bar.update(len(idx))
        for i in in_window:
            yield done.pop(i)
    bar.close()


@torch.no_grad()
def _score_whole(model, prompt: list[int], conts: list[list[int]], pad_id: int, device,
                 extra: Callable[[torch.Tensor], dict] | None = None) -> ChoiceScore:
    """Exact scores of one example's labels: prompt + each label as one right-padded row, through the model's own
    forward (``extra(ids)``: more inputs, e.g. the pixels). Logits of virtual tokens put in front (prompt
    tuning) are skipped."""
    ids, mask = _pad([prompt + cont for cont in conts], pad_id)
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if extra is not None:
        inputs.update({k: v.to(device) for k, v in extra(ids).items()})
    logits = model(**inputs).logits
    start = logits.shape[1] - ids.shape[1] + len(prompt) - 1
    logprobs = []
    for j, cont in enumerate(conts):
        rows = logits[j, start:start + len(cont)].float()
        logprobs.append(float(torch.log_softmax(rows, dim=-1)[torch.arange(len(cont)), torch.tensor(cont)].sum()))
    return ChoiceScore(logprobs, [len(c) for c in conts])


def image_choice_scores(model, tokenizer, template: Template, vision, conversations: Sequence[Sequence[Message]],
                        labels: Sequence[str], progress: bool = True) -> Iterator[ChoiceScore]:
    """:func:`choice_scores` for prompts with images (a vision-language model): every label scored exactly, one
    forward per example over its prompt + each label (the pixels go with each row; no shared-prefix cache)."""
    if not labels:
        raise ValueError("choice scoring needs at least one candidate label")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for conversation in tqdm(conversations, desc="choice scoring", disable=not progress, dynamic_ncols=True):
        rendered = render_conversation(list(conversation), tokenizer, template, for_generation=True, vision=vision)
        prompt = rendered.input_ids
        conts = [label_continuation(conversation, lab, tokenizer, template, prompt, vision) for lab in labels]
        images = list(rendered.images)
        pixels = (lambda ids: vision.batch_inputs(ids, images * len(labels), [len(images)] * len(labels))) \
            if images else None
        yield _score_whole(model, prompt, conts, pad_id, device, pixels)


def _left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows padded on the left, so every row's last token is in the last column."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, rows_per_chunk: int = 64) -> torch.Tensor:
    """log_softmax(logits)[..., target] in float32, without writing the full log-softmax.

    ``logits`` (..., vocab) in any float dtype, ``targets`` (...) token ids. The log-normaliser
    is taken a few rows at a time in float32, so a batch's vocabulary-wide logits are read once
    instead of being upcast and rewritten twice (on a CPU that memory traffic cost about as much
    as the model's last layer)."""
    flat = logits.reshape(-1, logits.shape[-1])
    tgt = targets.reshape(-1).to(flat.device)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    for start in range(0, flat.shape[0], rows_per_chunk):
        part = flat[start:start + rows_per_chunk].float()
        out[start:start + rows_per_chunk] = (part.gather(-1, tgt[start:start + rows_per_chunk, None]).squeeze(-1)
                                             - torch.logsumexp(part, dim=-1))
    return out.reshape(targets.shape)


CPU_SCORING_BYTES = 512 << 20  # key/value cache and label logits of one batch of examples, on a CPU
CPU_SCORING_MAX = 128


def cpu_batch(model, requested: int, prompts: Sequence[list[int]], n_prefix: int, label_lengths: Sequence[int]) -> int:
    """Examples per batch: on a CPU at least ``requested`` and as many as fit in CPU_SCORING_BYTES (at most
    CPU_SCORING_MAX), because there each forward pass has a large fixed cost and memory is plentiful (SNIPS's
    700 utterances with SmolLM2-135M in bf16: 13.9 s at batch 16, 12.3 s at 32, 10.1 s at 128); elsewhere
    ``requested`` as given."""
    config = getattr(model, "config", None)
    if next(model.parameters()).device.type != "cpu" or config is None:
        return requested
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers, heads = getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)
    hidden, vocab = getattr(config, "hidden_size", None), getattr(config, "vocab_size", None)
    if not (layers and heads and hidden and vocab):
        return requested
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    size = next(model.parameters()).element_size()
    tokens = max(len(p) for p in prompts) - n_prefix + sum(label_lengths)
    per_example = layers * 2 * kv_heads * head_dim * tokens * size + sum(label_lengths) * vocab * size
    return max(requested, min(CPU_SCORING_MAX, CPU_SCORING_BYTES // max(per_example, 1)))


def _score_batch(model, suffixes: list[list[int]], conts: list[list[list[int]]], prefix_layers, n_prefix: int,
                 pad_id: int, device, dtype, prune: bool = False, normalize: bool = False,
                 tally: _PruneTally | None = None) -> list[ChoiceScore]:
    from transformers import DynamicCache

    # left padding: every prompt ends in the last column, so only that column reaches the vocabulary
    ids, own = _left_pad(suffixes, pad_id)
    b, width = ids.shape
    lengths = own.sum(1)
    mask = own
    cache = None
    if prefix_layers is not None:
        cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix_layers])
        mask = torch.cat([torch.ones((b, n_prefix), dtype=torch.long), own], dim=1)
    position = (n_prefix + own.cumsum(1) - 1).clamp(min=0)
    name = cache_arg(model)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position.to(device),
                use_cache=True, logits_to_keep=1, **{name: cache})
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    cache, cached = output_cache(out), mask.shape[1]
    n_labels = len(conts[0])
    sums = torch.zeros((b, n_labels), dtype=torch.float64)
    counts = torch.ones((b, n_labels), dtype=torch.long)
    for r in range(b):
        sums[r] = first[r, [c[0] for c in conts[r]]].double().cpu()
    sizes = torch.tensor([[len(c) for c in row] for row in conts], dtype=torch.float64)
    done = sizes <= 1  # a one-token continuation is scored by its first token alone

    def run(chosen: list[list[int]]) -> int:
        """Score the rest of the chosen labels' tokens, packed one row per example, on the prompt cache;
        returns the label positions run (padding included: it costs the same).

        Only examples with something to score take part, so one uncertain example does not
        widen every row of the batch."""
        active = [r for r in range(b) if any(len(conts[r][j]) > 1 for j in chosen[r])]
        if not active:
            return 0
        idx = torch.tensor(active, dtype=torch.long)
        sub = [[conts[r][j] for j in chosen[r]] for r in active]
        lab_ids, targets, offset, owner, lab_mask = _label_rows(sub, mask[idx], dtype)
        past = cache
        if len(active) < b:  # the active examples' rows of the prompt cache (a copy: the cache stays whole)
            on = idx.to(device)
            past = DynamicCache(ddp_cache_data=[(layer.keys[on], layer.values[on]) for layer in cache.layers])
        position = n_prefix + lengths[idx].unsqueeze(1) + offset
        logits = model(input_ids=lab_ids.to(device), attention_mask=lab_mask.to(device), position_ids=position.to(device),
                       use_cache=True, **{name: past}).logits
        extra = cache.get_seq_length() - cached
        if extra > 0:
            cache.crop(-extra)  # the next pass sees the prompt only
        logp = target_logprobs(logits, targets).cpu()
        real = owner >= 0
        local = torch.arange(len(active)).unsqueeze(1).expand_as(owner)[real]
        lookup = torch.full((len(active), max(1, max(len(c) for c in chosen))), -1, dtype=torch.long)
        for i, r in enumerate(active):
            lookup[i, :len(chosen[r])] = torch.tensor(chosen[r], dtype=torch.long)
        rows, label = idx[local], lookup[local, owner[real]]
        sums.index_put_((rows, label), logp[real].double(), accumulate=True)
        counts.index_put_((rows, label), torch.ones(int(real.sum()), dtype=torch.long), accumulate=True)
        done[rows, label] = True
        return lab_ids.numel()

    if not prune:
        run([[j for j in range(n_labels) if not done[r, j]] for r in range(b)])
        return [ChoiceScore(sums[r].tolist(), counts[r].tolist()) for r in range(b)]

    # bound on each label's final score: every further token adds a log-probability <= 0
    bound = sums / sizes if normalize else sums.clone()
    two_passes = tally is None or tally.two_passes()
    open_positions = ran = 0
    for first_round in ((True, False) if two_passes else (False,)):
        final = torch.where(done, sums / counts if normalize else sums, torch.tensor(-math.inf, dtype=torch.float64))
        best = final.max(dim=1, keepdim=True).values
        open_ = ~done & (bound >= best)
        if first_round:  # the most promising open label of each example first: its full score prunes the rest
            top = torch.where(open_, bound, torch.tensor(-math.inf, dtype=torch.float64)).argmax(dim=1)
            chosen = [[int(top[r])] if open_[r].any() else [] for r in range(b)]
        else:
            chosen = [torch.nonzero(open_[r]).flatten().tolist() for r in range(b)]
        if first_round:  # what one pass over the open labels would run: a row per example, padded to the longest
            per_row = ((sizes - 1) * open_).sum(dim=1)
            open_positions = int((per_row > 0).sum()) * int(per_row.max())
        ran += run(chosen)
    if two_passes and tally is not None:
        tally.open_positions += open_positions
        tally.run_positions += ran
    return [ChoiceScore(sums[r].tolist(), [len(c) for c in conts[r]], done[r].tolist()) for r in range(b)]


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
