"""Batched generation speed: fewtune's generate against plain `model.generate`, greedy, same outputs.

    python benchmarks/generate_speed.py [--n 100] [--batch-size 16] [--max-new-tokens 80]
        [--run RUN_DIR] [--dtype float32|bfloat16]

The car-command test set (the demo's Chinese voice commands, src/fewtune/demo/data), each command
as the demo prompts it (its system prompt, the model's chat template). The model is the embedded
default model, or a fine-tuned run (adapter merged, as `fewtune eval` loads it), which writes
short JSON answers and stops, so rows of a batch finish at different steps.

- plain:   `model.generate` per batch of the prompts in file order, left padding, greedy, stopping
           at the end-of-turn token only, as a user of transformers writes it;
- fewtune: `fewtune.generate.generate` (what eval, chat and the server call) with the same batch size:
           its own decoding loop (fewtune.decode): batches sorted by prompt length, the prefix all
           prompts share run once, finished rows dropped from the batch.

Both arms' texts are cut at the template's stop strings and compared: the table says whether every
output is the same. tokens/s counts generated tokens up to the stop (what the user gets), over the
arm's whole wall time. Writes benchmarks/results/generate_speed.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fewtune.config import GenerateSection
from fewtune.data.formats import load_examples
from fewtune.demo.car_commands import SYSTEM_PROMPT
from fewtune.generate import cut_at_stop, generate, load_for_inference, prompt_ids
from _machine import cpu_kind  # noqa: E402  (benchmarks/_machine.py)

ROOT = Path(__file__).resolve().parents[1]
TEST = ROOT / "src" / "fewtune" / "demo" / "data" / "car_commands_test.jsonl"
OUT = ROOT / "benchmarks" / "results" / "generate_speed.md"


@torch.no_grad()
def plain(loaded, conversations, batch_size: int, max_new_tokens: int) -> tuple[list[str], float]:
    tok, model = loaded.tokenizer, loaded.model
    stops = loaded.template.stop_strings(tok)
    prompts = [prompt_ids(loaded, c) for c in conversations]
    texts: list[str] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tok.pad_token_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for row in tok.batch_decode(out[:, width:], skip_special_tokens=False):
            texts.append(cut_at_stop(row, stops + [t for t in (tok.pad_token,) if t]).strip())
    return texts, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--run", default=None, help="a fine-tuned run directory (default: the base model)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    machine = cpu_kind()
    print(f"CPU: {machine}; torch threads {torch.get_num_threads()}", flush=True)
    examples = load_examples(TEST)[:args.n]
    target = args.run or "smollm2-135m-instruct"
    loaded = load_for_inference(target, system_prompt=None if args.run else SYSTEM_PROMPT, dtype=args.dtype,
                                merge=True)
    conversations = [e.prompt_messages for e in examples]
    tok = loaded.tokenizer
    rows = []
    plain_texts, plain_s = plain(loaded, conversations, args.batch_size, args.max_new_tokens)
    rows.append(("plain `model.generate`", plain_texts, plain_s))
    print(f"plain: {plain_s:.1f} s", flush=True)
    gen = GenerateSection(temperature=0.0, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    start = time.perf_counter()
    ours = [o[0] for o in generate(loaded, conversations, gen, progress=False)]
    ours_s = time.perf_counter() - start
    rows.append(("fewtune `generate`", ours, ours_s))
    print(f"fewtune: {ours_s:.1f} s", flush=True)
    tokens = lambda texts: sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)  # noqa: E731
    same = sum(a == b for a, b in zip(plain_texts, ours))
    lines = ["# Batched generation speed", "",
             f"Command: `python benchmarks/generate_speed.py --n {args.n} --batch-size {args.batch_size} "
             f"--max-new-tokens {args.max_new_tokens} --dtype {args.dtype}" + (f" --run {args.run}`" if args.run else "`"),
             "", f"Measured {time.strftime('%Y-%m-%d')} on {machine}; torch {torch.__version__}, {torch.get_num_threads()} threads. Model: {target} "
             f"({args.dtype}), greedy, {len(conversations)} car commands, batch {args.batch_size}.", "",
             "| arm | seconds | generated tokens | tokens/s | vs plain |", "|---|---:|---:|---:|---:|"]
    for name, texts, seconds in rows:
        n = tokens(texts)
        lines.append(f"| {name} | {seconds:.1f} | {n:,} | {n / seconds:.1f} | {plain_s / seconds:.2f}x |")
    lines += ["", f"Same outputs as plain: {same} of {len(conversations)}."]
    text = "\n".join(lines) + "\n"
    # each run adds its section above the hand-written notes (a run per model and dtype is one table each)
    old = OUT.read_text(encoding="utf-8") if OUT.exists() else "# Batched generation speed\n"
    head, marker, notes = old.partition("## Notes")
    body = text.split("\n", 2)[2]  # without the title line
    OUT.write_text(head.rstrip("\n") + "\n\n" + body + ("\n" + marker + notes if marker else ""), encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
