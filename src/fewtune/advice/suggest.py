"""`fewtune suggest DATA`: a complete config for a small data set, with the reason for each choice.

The rules follow published small-data practice; each rule records the number that
triggered it, so the printed report and the YAML comments say why, not just what:

- size n decides the method (LoRA below 10,000 examples), the rank (4 below 500, 8 below
  5,000, 16 above) and the epochs (OpenAI's legacy rule: 3, raised to min(25, 100 // n)
  when n * 3 < 100, lowered to 25,000 // n for large sets; 2 from ~1,000 examples);
- batch size is ~0.2% of the examples (OpenAI's legacy default), at least 1, at most 256
  and at most what the memory estimate allows; then, unless told not to measure, training passes
  are timed at batch 1 to 32 on this machine and the fastest size per token is taken among those
  that still leave 50 optimizer steps (the smallest within 5% of the fastest: on a CPU batch 1
  trains ~3x slower per token than 8); the learning rate starts from a reference at batch 8
  (LoRA: 5e-4 for models under 1B parameters, measured on SNIPS and the car-command task, 2e-4
  for larger ones; 1e-5 for full fine-tuning) and is scaled to that batch by the square-root
  rule (Adam) or the linear rule (SGD-style);
- lengths (rendered by the one render function) set max_length to cover 99% of examples;
- warmup 10%, weight decay 0.01, gradient clipping 1.0, cosine schedule, early stopping on
  the held-out split (evaluated twice an epoch);
- a classification set (labels, or few distinct short completions) gets choice-scoring
  evaluation, the best checkpoint by validation accuracy (ties: lower loss) rather than loss,
  and a warning when the classes are unbalanced.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fewtune.config import Config, build_config
from fewtune.models import DEFAULT_MODEL

log = logging.getLogger(__name__)

REFERENCE_BATCH = 8
MIN_UPDATES = 50  # a measured batch size is taken only if it leaves at least this many optimizer steps
# with a measured batch above the 0.2% rule's, the epochs rise until the run keeps the rule's optimizer steps, up to
# STEPS_KEPT of them, in at most EPOCHS_FOR_STEPS epochs (benchmarks/results/small_data.md: SNIPS at batch 8)
STEPS_KEPT = 200
EPOCHS_FOR_STEPS = 10
REFERENCE_LR = {"lora": 2e-4, "full": 1e-5}
LR_BOUNDS = {"lora": (1e-4, 2e-4), "full": (5e-6, 2e-5)}  # the ranges small-data practice reports
# LoRA on a model under SMALL_MODEL parameters: a higher reference and ceiling, measured (benchmarks/results/
# small_data.md, smollm2-135m): SNIPS-40 at batch 8, lr 2e-4 0.930 +- 0.009 test accuracy over 3 seeds against
# 0.955 +- 0.003 at 5e-4; at batch 2 (10 examples per intent; the car-command JSON task at 50 examples) the old
# 1e-4 gave 0.667 accuracy and 0.07 exact match, 2.5e-4 (5e-4 scaled by sqrt(2/8)) 0.823 and 0.28, and `tune`'s
# winners on both took 3.6e-4 at batch 1
SMALL_MODEL = 1e9
SMALL_MODEL_LORA = (5e-4, (1e-4, 5e-4))  # (reference lr at REFERENCE_BATCH, bounds)


@dataclass
class Rule:
    key: str  # the config key it sets ("" for advice with no key)
    value: object
    reason: str

    def __str__(self) -> str:
        return f"{self.key} = {self.value}: {self.reason}" if self.key else f"note: {self.reason}"


@dataclass
class DataProfile:
    n: int
    lengths: list[int]  # rendered tokens per example
    task: str  # classification or generation
    labels: Counter


@dataclass
class Suggestion:
    config: Config
    rules: list[Rule]
    profile: DataProfile
    throughput: dict[int, float] = field(default_factory=dict)  # measured training tokens/s by batch size

    def report(self) -> str:
        return "\n".join(str(r) for r in self.rules)


def percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def profile_data(path: str | Path, tokenizer, template, task: str = "auto", vision=None) -> DataProfile:
    from fewtune.data.formats import load_examples
    from fewtune.data.render import render_conversation

    examples = load_examples(path)
    if not examples:
        from fewtune.data.formats import DataError

        raise DataError(str(path), None, "no examples to suggest a config for")
    lengths = [len(render_conversation(e.messages, tokenizer, template, vision=vision).input_ids) for e in examples]
    labels = Counter(e.label for e in examples if e.label is not None)
    if not labels:  # completions that repeat from a small set are labels too
        answers = Counter(e.reference.strip() for e in examples if e.reference)
        if answers and len(answers) <= max(2, min(50, len(examples) // 4)):
            labels = answers
    if task == "auto":
        task = "classification" if labels else "generation"
    elif task == "classification" and not labels:
        labels = Counter(e.reference.strip() for e in examples if e.reference)
    return DataProfile(len(examples), lengths, task, labels)


def epochs_rule(n: int) -> tuple[int, str]:
    if n * 3 < 100:
        e = min(25, 100 // n)
        return e, f"n={n}: n*3={n * 3} < 100, so OpenAI's legacy rule raises 3 epochs to min(25, 100 // {n}) = {e}"
    if n * 3 > 25000:
        e = max(1, 25000 // n)
        return e, f"n={n}: n*3={n * 3} > 25000, so the legacy rule lowers the epochs to 25000 // {n} = {e}"
    if n >= 1000:
        return 2, f"n={n} >= 1000: 2 epochs (2-3 is the usual range for ~1k examples; more overfits)"
    return 3, f"n={n}: 3 epochs (OpenAI's legacy default; n*3={n * 3} >= 100)"


def epochs_for_size(n: int, batch: int) -> tuple[float, str]:
    """The epochs suggest would give ``n`` training examples at ``batch``: the legacy rule, raised (as suggest
    raises it) where ``batch`` is above the 0.2% rule's batch so the planned optimizer steps are kept."""
    epochs, why = epochs_rule(n)
    rules = [Rule("train.epochs", epochs, why)]
    epochs = _keep_steps(rules, n, epochs, max(1, min(256, round(0.002 * n))), batch)
    return epochs, rules[0].reason


def _model_config(model_name: str):
    """The model's transformers config, or None when it cannot be read (a suggestion should not stop on it)."""
    from transformers import AutoConfig

    from fewtune.models import resolve_model_path

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(model_name))
    except Exception:
        return None
    return getattr(config, "text_config", None) or config  # a vision-language model: its language part


def model_parameters(model_name: str) -> int | None:
    """About how many weights the model has, from its config's shape (no weights are loaded): per layer 4 h^2 for
    attention and 3 h x intermediate for a gated MLP, plus the h x vocabulary embedding. None if unreadable."""
    config = _model_config(model_name)
    hidden, layers = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
    if not isinstance(hidden, int) or not isinstance(layers, int):
        return None
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    vocab = getattr(config, "vocab_size", None) or 32000
    return layers * (4 * hidden * hidden + 3 * hidden * inter) + vocab * hidden


def lora_lr_reference(model_name: str) -> tuple[float, tuple[float, float], str]:
    """The LoRA learning rate at REFERENCE_BATCH, its bounds, and why: higher for a model under SMALL_MODEL."""
    n = model_parameters(model_name)
    if n is not None and n < SMALL_MODEL:
        lr, bounds = SMALL_MODEL_LORA
        return lr, bounds, (f"a model of about {n / 1e6:.0f}M parameters (< 1B) takes {lr:g} (measured on SNIPS at "
                            "batch 8: 0.955 test accuracy against 0.930 at 2e-4)")
    what = "an unreadable model config" if n is None else f"a model of about {n / 1e9:.1f}B parameters"
    return REFERENCE_LR["lora"], LR_BOUNDS["lora"], f"{what}: the usual LoRA {REFERENCE_LR['lora']:g}"


def memory_batch_limit(model_name: str, max_length: int) -> tuple[int, str]:
    """A rough upper bound on the batch size from the activation memory per token."""
    import torch

    config = _model_config(model_name)
    # an unreadable config should not stop a suggestion: assume a 1B-class model
    hidden = getattr(config, "hidden_size", 2048) if config is not None else 2048
    layers = getattr(config, "num_hidden_layers", 24) if config is not None else 24
    if torch.cuda.is_available():
        budget = torch.cuda.get_device_properties(0).total_memory * 0.5
        where = f"half of the GPU's {budget * 2 / 2**30:.0f} GiB"
    else:
        budget = 8 * 2**30
        where = "8 GiB of CPU memory"
    per_token = 4 * hidden * layers * 20  # ~20 saved fp32 activations per hidden unit and layer
    limit = max(1, int(budget // (per_token * max_length)))
    return limit, (f"memory: {where} / ({per_token / 2**20:.2f} MiB of activations per token x {max_length} tokens) "
                   f"allows about {limit} examples per batch")


def suggest(data: str | Path, model: str = DEFAULT_MODEL, task: str = "auto", lr_rule: str = "sqrt",
            method: str = "auto", out: str | Path | None = None, measure: bool = True,
            progress: bool = True) -> Suggestion:
    """Profile the data and build a config with the reasons. The function `fewtune suggest` calls.

    ``measure``: time training passes of the model on this machine at batch sizes 1 to 32 and weigh the
    tokens/s in the batch rule (:mod:`fewtune.advice.throughput`); without it the batch is the 0.2% rule's."""
    from fewtune.data.render import Template
    from fewtune.models import load_tokenizer

    if lr_rule not in ("sqrt", "linear"):
        raise ValueError(f"lr_rule must be sqrt or linear, got {lr_rule!r}")
    tokenizer = load_tokenizer(model)
    template = Template.for_tokenizer(tokenizer)
    from fewtune.vision import vision_for

    p = profile_data(data, tokenizer, template, task, vision_for(model))  # image tokens count in the lengths
    n, rules = p.n, []
    add = lambda key, value, reason: rules.append(Rule(key, value, reason))  # noqa: E731

    # data
    p99, longest = percentile(p.lengths, 0.99), max(p.lengths)
    max_length = min(4096, max(64, 32 * math.ceil(p99 / 32)))
    cut = sum(x > max_length for x in p.lengths)
    add("data.max_length", max_length, f"99% of the {n} examples render to <= {p99} tokens (longest {longest}); "
        f"rounded up to a multiple of 32, {cut} example(s) would be cut")
    if cut:
        add("data.on_bad_example", "drop", f"{cut} example(s) longer than {max_length} tokens: one whose completion is "
            "cut away entirely is skipped and counted instead of stopping the run")
    val_ratio = round(min(0.2, max(0.1, 20 / n)), 3) if n >= 25 else 0.2
    add("data.val_ratio", val_ratio, f"n={n}: hold out {val_ratio:.0%} ({round(val_ratio * n)} examples) for "
        "validation and early stopping (at least ~20 when the set allows, at most 20%)")
    add("data.prompt_loss_weight", 0.0, "loss on the completions only: the prompt is given, not learned")

    # method
    if method == "auto":
        method = "lora" if n < 10000 else "full"
        add("method.name", method, f"n={n} {'<' if method == 'lora' else '>='} 10000: "
            + ("LoRA trains <1% of the weights, which overfits less on small data" if method == "lora"
               else "enough data to move every weight"))
    else:
        add("method.name", method, "as asked")
    train_n = n - round(val_ratio * n)
    if method == "lora":
        r = 4 if n < 500 else 8 if n < 5000 else 16
        add("method.lora.r", r, f"n={n}: rank {r} ({'<500: 4' if n < 500 else '<5000: 8' if n < 5000 else '16'}); "
            "a low rank is enough for a few hundred to a few thousand examples")
        add("method.lora.alpha", 2 * r, f"alpha = 2 x r = {2 * r} (update scale alpha/r = 2)")
        dropout = 0.1 if n < 1000 else 0.05
        add("method.lora.dropout", dropout, f"n={n} {'<' if n < 1000 else '>='} 1000: dropout {dropout}")
        add("method.lora.target_modules", "all-linear", "all linear layers: better than attention-only at equal rank")

    # schedule
    epochs, why = epochs_rule(n)
    add("train.epochs", epochs, why)
    share = round(0.002 * n)
    batch = max(1, min(256, share))
    limit, mem_why = memory_batch_limit(model, max_length)
    why = f"about 0.2% of n={n} is {0.002 * n:.2f} -> {batch} (OpenAI's legacy default, between 1 and 256)"
    if batch > limit:
        why += f"; {mem_why}, so {limit}"
        batch = limit
    measured: dict[int, float] = {}
    rule_batch = batch
    if measure:
        batch, why = _weigh_throughput(data, model, rules, batch, why, limit, train_n, epochs, progress, measured)
    add("train.batch_size", batch, why)
    epochs = _keep_steps(rules, train_n, epochs, rule_batch, batch)
    if method == "full":
        base, (lo, hi), size_why = REFERENCE_LR["full"], LR_BOUNDS["full"], ""
    else:
        base, (lo, hi), size_why = lora_lr_reference(model)
        size_why = f" ({size_why})"
    factor = (batch / REFERENCE_BATCH) ** 0.5 if lr_rule == "sqrt" else batch / REFERENCE_BATCH
    lr = float(f"{min(hi, max(lo, base * factor)):.3g}")
    add("train.lr", lr, f"{base:g} at batch {REFERENCE_BATCH} for {method}{size_why}, scaled by the {lr_rule} rule "
        f"to batch {batch}: x{factor:.3f} = {base * factor:.3g}"
        + (f", kept within [{lo:g}, {hi:g}]" if lr != float(f"{base * factor:.3g}") else ""))
    steps_per_epoch = math.ceil(train_n / batch)
    total = math.ceil(steps_per_epoch * epochs)
    add("train.warmup_ratio", 0.1, f"10% of the {total} steps ({math.ceil(0.1 * total)}) warm up: Adam's first "
        "steps are noisy")
    add("train.scheduler", "cosine", "cosine decay to the end")
    add("train.weight_decay", 0.01, "weight decay 0.01")
    add("train.max_grad_norm", 1.0, "clip gradients at norm 1.0 against spikes")
    eval_every = max(1, steps_per_epoch // 2)
    add("eval.every", eval_every, f"{steps_per_epoch} steps per epoch ({train_n} examples / batch {batch}): "
        "evaluate twice an epoch so early stopping can act within an epoch")
    classify = p.task == "classification" and bool(p.labels)
    add("eval.early_stopping.patience", 3, f"stop after 3 evaluations without a better validation "
        f"{'accuracy' if classify else 'loss'}; the best weights are kept")

    # task
    if classify:
        counts = p.labels.most_common()
        ratio = counts[0][1] / counts[-1][1]
        add("", None, f"classification: {len(counts)} classes ({', '.join(f'{k}: {v}' for k, v in counts[:8])}"
            f"{', ...' if len(counts) > 8 else ''}); evaluate by choice scoring (the log-probability of each label), "
            "not by free generation")
        add("eval.task", "classification", "every evaluation also choice-scores the held-out examples")
        add("eval.metric", "accuracy", f"the best checkpoint and early stopping follow validation accuracy "
            f"(ties: the lower loss), not the loss, which on ~{round(val_ratio * n)} held-out examples can bottom out "
            "long before the accuracy does (FewCLUE eprstmt, 20 held out: loss-chosen checkpoints at half an epoch "
            "predicted one class for 79-89% of the test reviews on 2 of 3 seeds)")
        if ratio > 3:
            add("", None, f"the classes are unbalanced (largest/smallest = {ratio:.1f} > 3): add examples of the rare "
                "classes or check that the metric is macro-F1")
    else:
        add("", None, f"generation task: no labels found (n={n}); evaluate by generation against references")

    cfg = _config(data, model, rules)
    if out is not None:
        write_config(cfg, rules, out)
    return Suggestion(cfg, rules, p, measured)


def _config(data: str | Path, model: str, rules: list[Rule]) -> Config:
    values = {"model": {"name": model}, "data": {"train": str(Path(data).resolve())}, "method": {}, "train": {}}
    for rule in rules:
        if rule.key:
            node = values
            *parents, last = rule.key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = rule.value
    return build_config(values, source="fewtune suggest")


def _keep_steps(rules: list[Rule], train_n: int, epochs: float, rule_batch: int, batch: int) -> float:
    """More epochs when the measured batch is larger than the rule's: the run keeps the optimizer steps the rule
    planned, up to STEPS_KEPT, in at most EPOCHS_FOR_STEPS epochs (early stopping still ends it when validation
    stops improving). Returns the epochs; the train.epochs rule is updated with the reason."""
    if batch <= rule_batch:
        return epochs
    planned = math.ceil(train_n / rule_batch) * epochs
    per_epoch = math.ceil(train_n / batch)
    wanted = min(planned, STEPS_KEPT)
    if per_epoch * epochs >= wanted:
        return epochs
    raised = max(epochs, min(EPOCHS_FOR_STEPS, math.ceil(wanted / per_epoch)))
    if raised == epochs:
        return epochs
    i = next(i for i, r in enumerate(rules) if r.key == "train.epochs")
    rules[i] = Rule("train.epochs", raised, f"{rules[i].reason}; raised to {raised} because batch {batch} (not "
                    f"{rule_batch}) makes {per_epoch} steps per epoch: {raised} epochs keep {per_epoch * raised} of the "
                    f"{wanted} optimizer steps the rule planned (at most {STEPS_KEPT}, in at most {EPOCHS_FOR_STEPS} "
                    "epochs). Measured on SNIPS, 280 examples, batch 8: 3 epochs (about 95 steps) under-train, dev "
                    "accuracy 0.743 against 0.893 at 6 epochs (lr 2e-4), 3-fold CV 0.639 against 0.929 at 8 epochs")
    return raised


def _weigh_throughput(data, model: str, rules: list[Rule], batch: int, why: str, limit: int, train_n: int,
                      epochs: float, progress: bool, measured: dict[int, float] | None = None) -> tuple[int, str]:
    """The batch size once measured training throughput is weighed in (see throughput.choose), or the rule's
    own ``batch`` with the reason it stayed; ``measured`` receives the tokens/s by batch size."""
    from fewtune.advice import throughput
    from fewtune.data.dataset import render_set
    from fewtune.data.formats import load_examples
    from fewtune.data.render import Template
    from fewtune.models import load_tokenizer

    cfg = _config(data, model, rules)
    tokenizer = load_tokenizer(model)
    from fewtune.vision import vision_for

    items = render_set(load_examples(data), tokenizer, Template.from_config(tokenizer, cfg), cfg.data,
                       "training", vision_for(model)).items
    sizes = [b for b in throughput.CANDIDATES if b <= limit] or [1]
    log.info("suggest: timing training passes at batch sizes %s on this machine (--no-measure skips this)",
             ", ".join(map(str, sizes)))
    results = throughput.measure(cfg, items, sizes, progress=progress)
    if measured is not None:
        measured.update({r.batch_size: r.tokens_per_s for r in results})
    picked = throughput.choose(results, 1, limit, train_n, epochs, MIN_UPDATES)
    if picked is None:
        return batch, why + f"; no measured batch size keeps {MIN_UPDATES} optimizer steps, so the rule's {batch} stays"
    chosen, reason = picked
    if chosen == batch:
        return batch, why + f"; {reason}"
    return chosen, f"{reason} (the 0.2% rule alone gives {batch})"


def write_config(cfg: Config, rules: list[Rule], out: str | Path) -> Path:
    """The complete config, every key, with the reasons as comments at the top and beside each key."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    reasons = {r.key: r.reason for r in rules if r.key}
    header = ["# written by `fewtune suggest`; every rule it applied:"] + [f"#   {r}" for r in rules]
    body = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True).splitlines()
    lines, path = [], []
    for line in body:
        indent = (len(line) - len(line.lstrip(" "))) // 2
        key = line.strip().split(":", 1)[0]
        path = path[:indent] + [key]
        reason = reasons.get(".".join(path))
        lines.append(f"{line}  # {reason}" if reason and not line.rstrip().endswith(":") else line)
    out.write_text("\n".join(header + lines) + "\n", encoding="utf-8")
    return out
