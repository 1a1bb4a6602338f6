"""Is greedy generation in bf16 reproducible, and does it score like fp32? (issue 16)

    python benchmarks/generate_precision.py [--run runs/demo] [--n 100] [--batch-sizes 1,16] [--max-new-tokens 80]

Generates the car-command test set with a fine-tuned run (default: runs/demo, what `fewtune demo`
trains) through fewtune's `generate`, greedy, in fp32 and in bf16 (weights cast once, as
`--precision bf16` does), each at several batch sizes. Reports, per arm: seconds, exact match with
the reference JSON, and how many outputs equal those of fp32 at batch 1 and of the same precision at
batch 1. bf16 rounds a matrix product differently when the batch changes shape (other rows, other
padding), so two logits within rounding can swap and greedy decoding takes another path: this
measures how often that happens and whether it moves the score.

Writes benchmarks/results/generate_precision.md (hand notes below the marker are kept).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fewtune.config import GenerateSection
from fewtune.data.formats import load_examples
from fewtune.generate import generate, load_for_inference
from _machine import cpu_kind, write_keeping_notes  # noqa: E402  (benchmarks/_machine.py)

ROOT = Path(__file__).resolve().parents[1]
TEST = ROOT / "src" / "fewtune" / "demo" / "data" / "car_commands_test.jsonl"
OUT = ROOT / "benchmarks" / "results" / "generate_precision.md"
NOTES = "<!-- written by hand below this line; generate_precision.py keeps it when it rewrites the results -->"


def same_json(text: str, reference: str) -> bool:
    try:
        return json.loads(text) == json.loads(reference)
    except (json.JSONDecodeError, TypeError):
        return text.strip() == reference.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default=str(ROOT / "runs" / "demo"))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--max-new-tokens", type=int, default=80)
    args = parser.parse_args()
    if not (Path(args.run) / "config.yaml").is_file():
        raise SystemExit(f"{args.run}: no finished run (train one with `fewtune demo`)")
    examples = load_examples(TEST)[:args.n]
    conversations = [e.prompt_messages for e in examples]
    references = [e.reference for e in examples]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    outputs: dict[tuple[str, int], list[str]] = {}
    seconds: dict[tuple[str, int], float] = {}
    for precision in ("no", "bf16"):
        loaded = load_for_inference(args.run, precision=precision, merge=True)  # as `fewtune eval` loads it
        for size in sizes:
            gen = GenerateSection(temperature=0.0, max_new_tokens=args.max_new_tokens, batch_size=size)
            start = time.perf_counter()
            outputs[(precision, size)] = [o[0] for o in generate(loaded, conversations, gen, progress=False)]
            seconds[(precision, size)] = time.perf_counter() - start
            print(f"{precision} batch {size}: {seconds[(precision, size)]:.1f} s", flush=True)
        del loaded
    reference_arm = ("no", sizes[0])
    argv = " ".join(sys.argv[1:])
    lines = ["# Greedy generation in fp32 and bf16: reproducibility and score", "",
             f"Command: `python benchmarks/generate_precision.py{' ' + argv if argv else ''}`, {time.strftime('%Y-%m-%d')}.",
             f"Machine: {cpu_kind()}; torch {torch.__version__}, {torch.get_num_threads()} threads. "
             f"Run: {args.run}; {len(conversations)} car commands, greedy, up to {args.max_new_tokens} new tokens.", "",
             "| precision | batch | seconds | exact match | same as fp32 batch " + str(sizes[0])
             + " | same as this precision at batch " + str(sizes[0]) + " |",
             "|---|---:|---:|---:|---:|---:|"]
    for (precision, size), texts in outputs.items():
        exact = sum(same_json(t, r) for t, r in zip(texts, references)) / len(texts)
        vs_fp32 = sum(a == b for a, b in zip(texts, outputs[reference_arm]))
        vs_own = sum(a == b for a, b in zip(texts, outputs[(precision, sizes[0])]))
        name = "fp32" if precision == "no" else "bf16"
        lines.append(f"| {name} | {size} | {seconds[(precision, size)]:.1f} | {exact:.3f} | {vs_fp32} of {len(texts)} "
                     f"| {vs_own} of {len(texts)} |")
    text = "\n".join(lines)
    write_keeping_notes(OUT, text, NOTES)
    print(text)


if __name__ == "__main__":
    main()
