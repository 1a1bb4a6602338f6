"""GGUF export of a fine-tuned run: file size and agreement with the merged model, per quantization.

    python benchmarks/gguf_export.py [--run runs/augment/car50/none-seed0] [--data runs/augment/car50/data/test.jsonl]
        [--quants f16,q8_0,q4_0] [--limit 20]

For each quantization: `fewtune export RUN --gguf runs/gguf/NAME-QUANT.gguf --quant QUANT --check DATA`
(fewtune.gguf_export.export_gguf and check_gguf): the file's size against the fp32 weights, how many of
the first LIMIT prompts render to the same tokens from the file's own tokenizer and chat template, how
many greedy outputs are the same, and the top-token agreement at every position of the merged model's
greedy continuation. llama.cpp's tokens/s on the file is measured when llama-cpp-python is installed
(transformers reads a GGUF by dequantizing it, so its speed says nothing about the format).
Writes benchmarks/results/gguf_export.md (CPU kind and command included), above the hand-written notes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fewtune.gguf_export import check_gguf, export_gguf
from _machine import cpu_kind, write_keeping_notes  # noqa: E402  (benchmarks/_machine.py)

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "benchmarks" / "results" / "gguf_export.md"
NOTES = "<!-- written by hand below this line; gguf_export.py keeps it when it rewrites the table -->"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default=str(ROOT / "runs" / "augment" / "car50" / "none-seed0"))
    parser.add_argument("--data", default=str(ROOT / "runs" / "augment" / "car50" / "data" / "test.jsonl"))
    parser.add_argument("--quants", default="f16,q8_0,q4_0")
    parser.add_argument("--limit", type=int, default=20)
    args = parser.parse_args()
    print(f"CPU: {cpu_kind()}; torch threads {torch.get_num_threads()}", flush=True)
    run = Path(args.run)
    lines = ["# GGUF export: size and agreement with the merged model", "",
             f"Command: `python benchmarks/gguf_export.py {' '.join(sys.argv[1:])}`, {time.strftime('%Y-%m-%d')}; "
             f"{cpu_kind()}, torch {torch.__version__}.", "",
             f"Run `{run.relative_to(ROOT) if run.is_relative_to(ROOT) else run}`, the first {args.limit} prompts of "
             f"`{Path(args.data).relative_to(ROOT) if Path(args.data).is_relative_to(ROOT) else args.data}`; greedy, "
             "32 new tokens.", "",
             "| quant | file MB | fp32 MB | same prompt tokens | same greedy output | top-token agreement | "
             "llama.cpp tokens/s | fp32 model tokens/s | export s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for quant in args.quants.split(","):
        out = ROOT / "runs" / "gguf" / f"{run.name}-{quant}.gguf"
        start = time.time()
        report = export_gguf(run, out, quant)
        seconds = time.time() - start
        check = check_gguf(run, out, args.data, limit=args.limit)
        speed = check["llama_cpp_tokens_per_s"]
        lines.append(f"| {quant} | {report.bytes / 2**20:.1f} | {check['fp32_bytes'] / 2**20:.1f} | "
                     f"{check['same_prompt_tokens']} of {check['examples']} | {check['same_greedy_output']} of "
                     f"{check['examples']} | {check['top_token_agreement']:.4f} ({check['positions']} positions) | "
                     f"{f'{speed:.1f}' if speed else 'not installed'} | {check['fp32_tokens_per_s']:.1f} | "
                     f"{seconds:.1f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    write_keeping_notes(TABLE, text, NOTES)
    print(text)


if __name__ == "__main__":
    main()
