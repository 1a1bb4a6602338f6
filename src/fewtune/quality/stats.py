"""Lengths, labels and size of a data set: the `data stats` part of `data check`.

Token counts come from :func:`render_conversation` with the model's own template, so they
are the counts training sees (template tokens, default system prompt and all), and the
truncation verdicts are the ones training would reach.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from fewtune.data.formats import Example
from fewtune.data.render import RenderError, Template, render_conversation
from fewtune.quality.textstats import language, summary, words


@dataclass
class Measure:
    """One example's lengths. Tokens: ``prompt`` carries no loss, ``completion`` does (the
    assistant turns); characters and words: the final assistant turn vs everything before it."""

    line: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cut: str = "none"  # none | partly | entirely: what max_length leaves of the completion
    kept_tokens: int = 0  # after truncation
    kept_completion_tokens: int = 0  # trained tokens left after truncation
    first_trained: int = 0  # position of the first token with loss (the prompt's length, single-turn)
    prompt_chars: int = 0
    completion_chars: int = 0
    prompt_words: int = 0
    completion_words: int = 0
    language: str = "en"
    error: str | None = None  # the template could not render it


@dataclass
class Settings:
    """What lengths and size depend on; built from a config by :func:`settings_from_config`."""

    max_length: int = 512
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    min_examples: int = 100  # warn below
    min_per_class: int = 5  # warn for rarer classes
    max_imbalance: float = 10.0  # warn when the largest class is this many times the smallest


def measure(examples: list[Example], tokenizer=None, template: Template | None = None,
            max_length: int = 512, progress: bool = True, desc: str = "measuring", vision=None) -> list[Measure]:
    """Lengths of every example; token counts only with a tokenizer and template (which
    ``max_length`` truncation is judged against), image tokens included with ``vision``."""
    out = []
    for example in tqdm(examples, desc=desc, unit="ex", disable=not progress or len(examples) < 200, leave=False):
        if example.is_text:  # a raw document is trained on whole: all of it counts as completion
            prompt_text, completion_text = "", example.messages[0].content
        else:
            prompt_text = "\n".join(m.content for m in example.prompt_messages)
            completion_text = example.reference or ""
        m = Measure(example.line, prompt_chars=len(prompt_text), completion_chars=len(completion_text),
                    prompt_words=len(words(prompt_text)), completion_words=len(words(completion_text)),
                    language=language(prompt_text + completion_text))
        if tokenizer is not None and template is not None:
            _measure_tokens(m, example, tokenizer, template, max_length, vision)
        out.append(m)
    return out


def _measure_tokens(m: Measure, example: Example, tokenizer, template: Template, max_length: int,
                    vision=None) -> None:
    try:
        full = render_conversation(example, tokenizer, template, None, prompt_loss_weight=0.0, vision=vision)
    except (RenderError, ValueError, TypeError) as err:  # a chat template may raise on odd conversations
        m.error = str(err).splitlines()[0][:300]
        return
    m.total_tokens = len(full)
    m.completion_tokens = sum(1 for w in full.loss_weights if w > 0)
    m.prompt_tokens = m.total_tokens - m.completion_tokens
    m.first_trained = next((i for i, w in enumerate(full.loss_weights) if w > 0), m.total_tokens)
    m.kept_tokens, m.kept_completion_tokens = m.total_tokens, m.completion_tokens
    if m.total_tokens > max_length and not example.is_text:  # training cuts a long document into pieces instead
        # the same call training makes; the first token is never a target, as in render_set
        cut = render_conversation(example, tokenizer, template, max_length, prompt_loss_weight=0.0, vision=vision)
        kept = sum(1 for w in cut.loss_weights[1:] if w > 0)
        m.kept_tokens, m.kept_completion_tokens = len(cut), kept
        m.cut = "entirely" if kept == 0 and m.completion_tokens else ("partly" if kept < m.completion_tokens else "none")


def length_stats(measures: list[Measure], max_length: int) -> dict:
    ok = [m for m in measures if m.error is None]
    stats: dict = {
        "chars": {"prompt": summary([m.prompt_chars for m in measures]),
                  "completion": summary([m.completion_chars for m in measures])},
        "words": {"prompt": summary([m.prompt_words for m in measures]),
                  "completion": summary([m.completion_words for m in measures])},
        "languages": dict(Counter(m.language for m in measures).most_common()),
    }
    if any(m.total_tokens for m in ok):
        stats["tokens"] = {"prompt": summary([m.prompt_tokens for m in ok]),
                           "completion": summary([m.completion_tokens for m in ok]),
                           "total": summary([m.total_tokens for m in ok])}
        stats["truncation"] = {"max_length": max_length,
                               "over_max_length": sum(m.total_tokens > max_length for m in ok),
                               "completion_cut_partly": sum(m.cut == "partly" for m in ok),
                               "completion_cut_entirely": sum(m.cut == "entirely" for m in ok)}
    return stats


def label_stats(examples: list[Example], min_per_class: int = 5) -> dict | None:
    labels = [e.label for e in examples if e.label is not None]
    if not labels:
        return None
    counts = Counter(labels)
    most, least = counts.most_common()[0][1], min(counts.values())
    return {"classes": len(counts), "labelled": len(labels),
            "counts": dict(counts.most_common()),
            "share": {k: round(v / len(labels), 4) for k, v in counts.most_common()},
            "imbalance_ratio": round(most / least, 2),
            "rare": sorted(k for k, v in counts.items() if v < min_per_class)}


def size_stats(measures: list[Measure], settings: Settings) -> dict:
    n = len(measures)
    per_batch = settings.batch_size * settings.grad_accum
    steps_per_epoch = math.ceil(n / per_batch) if n else 0
    out: dict = {"examples": n, "steps_per_epoch": steps_per_epoch, "epochs": settings.epochs,
                 "batch_size": settings.batch_size, "grad_accum": settings.grad_accum}
    if any(m.total_tokens for m in measures):
        per_epoch = sum(m.kept_tokens for m in measures)
        trained = sum(m.kept_completion_tokens for m in measures)
        if settings.max_steps:
            epochs = settings.max_steps / steps_per_epoch if steps_per_epoch else 0.0
            out["max_steps"] = settings.max_steps
        else:
            epochs = settings.epochs
        out.update(tokens_per_epoch=per_epoch, trained_tokens_per_epoch=trained,
                   tokens_per_run=round(per_epoch * epochs), trained_tokens_per_run=round(trained * epochs),
                   run_epochs=round(epochs, 3))
    return out


def plot_token_lengths(measures: list[Measure], out_path: str | Path, max_length: int, title: str = "") -> Path | None:
    """Histogram of total / prompt / completion token counts with the max_length cut marked."""
    ok = [m for m in measures if m.error is None and m.total_tokens]
    if not ok:
        return None
    from fewtune.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    totals = [m.total_tokens for m in ok]
    top = max(max(totals), max_length)
    bins = min(60, max(10, len(set(totals))))
    ax = axes[0]
    ax.hist(totals, bins=bins, range=(0, top), color="#3182bd", edgecolor="white")
    ax.axvline(max_length, color="#e6550d", linestyle="--", linewidth=2,
               label=f"max_length={max_length} ({sum(t > max_length for t in totals)} over)")
    ax.set_xlabel("tokens per example (template included)")
    ax.set_ylabel("examples")
    ax.set_title("whole example")
    ax.legend()
    ax = axes[1]
    upper = max(max(m.prompt_tokens for m in ok), max(m.completion_tokens for m in ok), 1)
    for values, colour, name in (([m.prompt_tokens for m in ok], "#6baed6", "prompt (no loss)"),
                                 ([m.completion_tokens for m in ok], "#31a354", "completion (trained)")):
        ordered = sorted(values)
        ax.hist(values, bins=bins, range=(0, upper), color=colour, alpha=0.55, histtype="stepfilled",
                label=f"{name}: median {ordered[len(ordered) // 2]}")
        ax.hist(values, bins=bins, range=(0, upper), color=colour, histtype="step", linewidth=1.5)
    ax.set_xlabel("tokens")
    ax.set_title("prompt vs completion")
    ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"{len(ok)} examples")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)
