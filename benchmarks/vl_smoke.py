"""Vision-language smoke run on real data: the embedded SmolLM2-135M as the language model of an Idefics3
(SmolVLM's architecture) with a fresh, randomly initialised vision tower, fine-tuned on LLaMA-Factory's
multimodal demo set.

    python benchmarks/vl_smoke.py [--epochs 15] [--table-only]

No vision-language model installs from a wheel here, so this answers one question: can the embedded
SmolLM2-135M serve as a real language backbone behind a fresh vision tower, through fewtune's whole
path (image data -> render -> LoRA + projector training -> save -> reload -> generate)? The model:
SmolLM2-135M's weights as Idefics3's text model (its tokenizer with Idefics3's image marker tokens added,
their embeddings started at the mean embedding), a SigLIP-style vision tower (4 layers, width 256,
224-pixel images in 16-pixel patches, no tiling: 49 image tokens per picture) and the connector, both
random. Training: LoRA r=16 on the text model plus the connector in full (model.vision.train_projector),
on ../shared/data/llamafactory-demo/mllm_demo.json (6 conversations, 8 images, 3 distinct pictures).

Reported: the loss per epoch; the first-turn answers before and after training against the reference;
and the same prompts with each picture swapped for another example's, which says whether the answers
depend on the picture at all (a random vision tower carries no semantics: the model can only learn to
tell the pictures apart). Writes benchmarks/results/vl_smoke.md; prints the CPU kind. Runs alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from fewtune.config import GenerateSection, build_config
from fewtune.data.formats import Message, load_examples
from fewtune.datasets.common import find_shared_data
from fewtune.generate import generate, load_for_inference
from fewtune.models import DEFAULT_MODEL, load_model, load_tokenizer
from fewtune.train.loop import train
from fewtune.vision import TILE_TOKENS
from _machine import cpu_kind, write_keeping_notes  # noqa: E402  (benchmarks/_machine.py)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "vl_smoke"
TABLE = ROOT / "benchmarks" / "results" / "vl_smoke.md"
NOTES = "<!-- written by hand below this line; vl_smoke.py keeps it when it rewrites the table -->"
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_model(out: Path) -> Path:
    """SmolLM2-135M as the text model of an Idefics3 with a fresh vision tower (written once to ``out``)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    if (out / "config.json").is_file():
        return out
    tok = load_tokenizer(DEFAULT_MODEL)
    tok.add_special_tokens({"additional_special_tokens": list(TILE_TOKENS)})
    tok.chat_template = TEMPLATE
    llm = load_model(DEFAULT_MODEL)
    llm.resize_token_embeddings(len(tok), mean_resizing=True)
    text = llm.config.to_dict()
    text["vocab_size"] = len(tok)
    config = Idefics3Config(
        text_config=text, vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                             num_attention_heads=4, image_size=224, patch_size=16),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config)
    missing = model.model.text_model.load_state_dict(llm.model.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, llm.lm_head.weight)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 224},
                              max_image_size={"longest_edge": 224}).save_pretrained(out)
    return out


def first_turns(examples) -> list[list[Message]]:
    """Each conversation's first user turn (the one that shows a picture)."""
    return [[e.messages[0]] for e in examples]


def swapped(conversations: list[list[Message]]) -> list[list[Message]]:
    """The same questions, each with the next example's picture (a different picture where there is one)."""
    images = [c[0].images for c in conversations]
    out = []
    for i, c in enumerate(conversations):
        other = next((images[(i + k) % len(images)] for k in range(1, len(images)) if images[(i + k) % len(images)]
                      != images[i]), images[i])
        out.append([Message(c[0].role, c[0].content, images=other)])
    return out


def answers(target: str, conversations) -> list[str]:
    loaded = load_for_inference(target, precision="no")
    return [o[0] for o in generate(loaded, conversations, GenerateSection(max_new_tokens=48), progress=False)]


def cell(text: str, width: int = 60) -> str:
    """A Markdown table cell: one line, no pipes, at most ``width`` characters."""
    flat = " ".join(text.replace("|", "/").split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    kind = cpu_kind()
    print(f"CPU: {kind}; torch threads {torch.get_num_threads()}", flush=True)
    if args.table_only:
        print(TABLE.read_text())
        return
    demo = find_shared_data() / "llamafactory-demo"
    examples = load_examples(demo / "mllm_demo.json")
    model = build_model(WORK / "model")
    prompts = first_turns(examples)
    before = answers(str(model), prompts)
    cfg = build_config({
        "model": {"name": str(model), "vision": {"train_projector": True}},
        "data": {"train": str(demo / "mllm_demo.json"), "val_ratio": 0.0, "max_length": 512},
        "method": {"name": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "train": {"output_dir": str(WORK / "run"), "epochs": args.epochs, "batch_size": 2, "lr": 1e-3,
                  "warmup_ratio": 0.1, "seed": 0, "mixed_precision": "no"},
    })
    if (WORK / "run").exists():
        shutil.rmtree(WORK / "run")  # a fresh run each time (the model folder is kept)
    start = time.time()
    result = train(cfg)
    wall = time.time() - start
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train_loss" in r]
    per_epoch: dict[int, list[float]] = {}
    for r in steps:
        per_epoch.setdefault(int(r["epoch"] - 1e-9), []).append(r["train_loss"])
    losses = {e: sum(v) / len(v) for e, v in sorted(per_epoch.items())}
    tokens_per_s = sum(r["tokens"] for r in steps) / max(sum(r["step_s"] for r in steps), 1e-9)
    after = answers(str(result.run_dir), prompts)
    blind = answers(str(result.run_dir), swapped(prompts))
    references = [e.messages[1].content for e in examples]
    exact = sum(a.strip() == r.strip() for a, r in zip(after, references))
    changed = sum(a != b for a, b in zip(after, blind))

    lines = [
        "# Vision-language smoke run: SmolLM2-135M behind a fresh vision tower, on mllm_demo",
        "",
        f"`python benchmarks/vl_smoke.py --epochs {args.epochs}` on {kind}, fp32.",
        "",
        "Model: Idefics3 (SmolVLM's architecture) with SmolLM2-135M-Instruct's weights as its text model, a random "
        "4-layer SigLIP-style vision tower (49 image tokens per 224-pixel picture) and a random connector. "
        "Training: LoRA r=16 on the text model + the connector in full (`model.vision.train_projector`), "
        f"batch 2, lr 1e-3, {args.epochs} epochs on mllm_demo.json (6 conversations, 8 images, 3 pictures); "
        f"{len(steps)} steps in {wall:.0f} s ({tokens_per_s:.0f} tokens/s).",
        "",
        "| epoch | mean train loss |",
        "|---:|---:|",
        *(f"| {e + 1} | {v:.3f} |" for e, v in losses.items()),
        "",
        f"First-turn answers ({exact} of {len(references)} exactly the reference after training; with each picture "
        f"swapped for another example's, {changed} of {len(references)} answers change):",
        "",
        "| prompt | reference | before | after | picture swapped |",
        "|---|---|---|---|---|",
        *(f"| {p[0].content.replace('<image>', '[img] ')} | {r} | {cell(b)} | {cell(a)} | {cell(s)} |"
          for p, r, b, a, s in zip(prompts, references, before, after, blind)),
        "",
    ]
    table = "\n".join(lines).replace("\n\n\n", "\n\n")
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    write_keeping_notes(TABLE, table, NOTES)
    print(table)


if __name__ == "__main__":
    main()
