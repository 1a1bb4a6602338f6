"""How choice scoring should run on a CPU: flat (prompt + label) rows vs shared prompt caches.

    python benchmarks/choice_speed.py [--n 70] [--batch-sizes 8,16] [--run RUN_DIR] [--eval-batch 32]
                                      [--dtypes float32,bfloat16]

Scores N SNIPS validation utterances (spread over the intents) against the 7 intents with
the default model in two ways and checks they agree:

- flat: one row per (example, label), prompt + label continuation, batched; the output
  layer only at the label positions. Simple, and every row repeats the whole prompt.
- shared (fewtune.eval.scoring.choice_scores): the prefix common to all prompts once,
  each example's own prompt tokens once, then only the label tokens per label, on the
  example's key/value cache; at several batch sizes.

Then the whole evaluation, all 700 validation utterances as `fewtune eval` runs them, for
the base model and (with --run) a fine-tuned run loaded as eval loads it (adapter merged):
every label scored exactly, and with pruning (labels that cannot beat the best one left at
their first-token bound; the argmax must not change). Time it on a quiet machine.

Writes benchmarks/results/choice_speed.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from fewtune.data.formats import load_examples
from fewtune.data.render import render_conversation
from fewtune.datasets.common import DatasetNotFound
from fewtune.datasets.snips import INTENTS, find_snips, write_intent_splits
from fewtune.eval.scoring import choice_scores, label_continuation
from fewtune.generate import load_for_inference
from _machine import cpu_kind, write_keeping_notes  # noqa: E402  (benchmarks/_machine.py)

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def flat_scores(loaded, conversations, labels, rows_per_batch: int = 28) -> tuple[list[list[float]], int]:
    """Summed label log-probs from full (prompt + continuation) rows; returns scores and positions run."""
    tok, model = loaded.tokenizer, loaded.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    rows = []
    for i, conv in enumerate(conversations):
        prompt = render_conversation(conv, tok, loaded.template, for_generation=True).input_ids
        for j, lab in enumerate(labels):
            rows.append((i, j, prompt, label_continuation(conv, lab, tok, loaded.template, prompt)))
    scores = [[0.0] * len(labels) for _ in conversations]
    positions = 0
    for start in range(0, len(rows), rows_per_batch):
        chunk = rows[start:start + rows_per_batch]
        width = max(len(p) + len(c) for _, _, p, c in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (_, _, p, c) in enumerate(chunk):
            ids[r, :len(p) + len(c)] = torch.tensor(p + c)
            mask[r, :len(p) + len(c)] = 1
        positions += int(mask.sum())
        hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        for r, (i, j, p, c) in enumerate(chunk):
            logits = base.get_output_embeddings()(hidden[r, len(p) - 1:len(p) + len(c) - 1])
            logp = torch.log_softmax(logits.float(), -1)
            scores[i][j] = float(logp[torch.arange(len(c)), torch.tensor(c)].sum())
    return scores, positions


class PositionCounter:
    """Counts the token positions the decoder runs (batch x width of every forward), via a hook."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.get_decoder().register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.n += ids.numel()

    def remove(self) -> int:
        self.handle.remove()
        return self.n


NOTES = "<!-- written by hand below this line; choice_speed.py keeps it when it rewrites the results -->"


def section(dtype: str, args, conversations, examples, labels) -> list[str]:
    """One dtype's two tables: the sample against flat rows, then the whole set as `fewtune eval` scores it."""
    loaded = load_for_inference("smollm2-135m-instruct", dtype=dtype)
    lines = [f"## {dtype}: {len(conversations)} SNIPS utterances x {len(labels)} intents "
             f"(smollm2-135m-instruct, {torch.get_num_threads()} thread(s))", "",
             "| method | batch | seconds | per 700 examples (extrapolated) | largest score difference to flat | same argmax |",
             "|---|---:|---:|---:|---:|---|"]
    t = time.time()
    flat, positions = flat_scores(loaded, conversations, labels)
    flat_s = time.time() - t
    flat_pred = [max(range(len(labels)), key=s.__getitem__) for s in flat]
    lines.append(f"| flat rows (prompt + label), {positions:,} positions | {28} rows | {flat_s:.1f} | "
                 f"{flat_s * 700 / len(conversations):.0f} s | - | - |")
    print(lines[-1], flush=True)
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        t = time.time()
        shared = list(choice_scores(loaded.model, loaded.tokenizer, loaded.template, conversations, labels,
                                    batch_size=bs, progress=False))
        s = time.time() - t
        diff = max(abs(a - b) for sc, fl in zip(shared, flat) for a, b in zip(sc.logprobs, fl))
        same_pred = sum(sc.best() == p for sc, p in zip(shared, flat_pred))
        lines.append(f"| shared prefix + per-example cache | {bs} examples | {s:.1f} | {s * 700 / len(conversations):.0f} s | "
                     f"{diff:.4f} | {same_pred} of {len(flat_pred)} |")
        print(lines[-1], flush=True)
    lines += ["", f"All {len(examples)} validation utterances, batch {args.eval_batch}, as `fewtune eval` scores them:", "",
              "| model | labels scored | seconds | positions run | same predictions as exact | accuracy |",
              "|---|---|---:|---:|---|---:|"]
    every = [e.prompt_messages for e in examples]
    gold = [e.label for e in examples]
    targets = [("base", "smollm2-135m-instruct")] + ([("fine-tuned", args.run)] if args.run else [])
    for name, target in targets:
        loaded = load_for_inference(target, merge=True, dtype=dtype)
        runs = {}
        for prune in (False, True):
            count = PositionCounter(loaded.model)
            t = time.time()
            scores = list(choice_scores(loaded.model, loaded.tokenizer, loaded.template, every, labels,
                                        batch_size=args.eval_batch, progress=False, prune=prune))
            s = time.time() - t
            runs[prune] = [sc.best() for sc in scores]
            acc = sum(labels[p] == g for p, g in zip(runs[prune], gold)) / len(gold)
            same = "-" if not prune else (f"{sum(a == b for a, b in zip(runs[True], runs[False]))} of {len(gold)}")
            lines.append(f"| {name} | {'pruned (exact argmax)' if prune else 'all, exactly'} | {s:.1f} | "
                         f"{count.remove():,} | {same} | {acc:.3f} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=70)
    parser.add_argument("--batch-sizes", default="8,16")
    parser.add_argument("--run", default=None, help="also time a fine-tuned run directory on all 700")
    parser.add_argument("--eval-batch", type=int, default=32, help="batch size for the whole-set timings")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="the weights' dtypes, one section each (bfloat16: every product in bf16)")
    args = parser.parse_args()
    try:
        _, val_file = write_intent_splits(find_snips(), ROOT / "runs" / "snips" / "data")
    except DatasetNotFound as err:
        raise SystemExit(str(err)) from None
    examples = load_examples(val_file)
    step = len(examples) // args.n
    conversations = [e.prompt_messages for e in examples[::step][:args.n]]  # every intent represented
    labels = list(INTENTS)
    load_before = os.getloadavg()
    argv = " ".join(sys.argv[1:])
    lines = ["# Choice scoring on CPU", "",
             f"Command: `python benchmarks/choice_speed.py{' ' + argv if argv else ''}`, {time.strftime('%Y-%m-%d')}.",
             f"Machine: {cpu_kind()}; torch {torch.__version__}.", ""]
    for dtype in args.dtypes.split(","):
        lines += section(dtype.strip(), args, conversations, examples, labels) + [""]
    load_after = os.getloadavg()
    lines += [f"Load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} on {os.cpu_count()} cores "
              "(above 2: other jobs shared the CPU and every number is inflated)."]
    text = "\n".join(lines)
    write_keeping_notes(ROOT / "benchmarks" / "results" / "choice_speed.md", text, NOTES)
    print(text)


if __name__ == "__main__":
    main()
