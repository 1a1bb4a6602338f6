"""Generation with exactly the template used in training.

A run directory carries its template (template.json) and tokenizer, so the prompt built
here is the one :func:`render_conversation` built for training. Prompts are batched with
left padding; stop strings end generation and are cut from the output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from fewtune.config import Config, GenerateSection, load_config
from fewtune.data.formats import Message
from fewtune.data.render import Template, render_conversation
from fewtune.models import load_model, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    template: Template
    config: Config | None  # the run's config, when loaded from a run directory
    source: str


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.yaml").is_file() and (path / "template.json").is_file()


def load_for_inference(path_or_model: str, template_kind: str = "auto", system_prompt: str | None = None,
                       dtype: str = "auto", merge: bool = False) -> Loaded:
    """A run directory (base + adapter, or full model) or any model name/folder/.gguf.

    ``merge=True`` folds a weight adapter (LoRA, DoRA, IA3) into the base weights in memory:
    the same outputs (within float rounding) without the adapter's extra matrix products,
    which matters on a CPU. Prompt-learning adapters (virtual tokens) stay as they are.
    """
    if is_run_dir(path_or_model):
        run = Path(path_or_model)
        cfg = load_config(run / "config.yaml")
        tokenizer = load_tokenizer(str(run / "tokenizer"))
        template = Template.load(run / "template.json")
        if (run / "adapter").is_dir():
            from peft import PeftModel

            base = load_model(cfg.model.name, dtype if dtype != "auto" else cfg.model.dtype)
            model = PeftModel.from_pretrained(base, str(run / "adapter"))
            if merge:
                from fewtune.train.adapters import is_prompt_learning

                if not is_prompt_learning(model):
                    model = model.merge_and_unload()
        elif (run / "model").is_dir():
            model = load_model(str(run / "model"), dtype)
        else:
            raise FileNotFoundError(f"{run} has no adapter/ or model/ folder: the run did not finish. "
                                    f"Resume it with: fewtune train --resume {run}")
        return Loaded(model.eval(), tokenizer, template, cfg, str(run))
    tokenizer = load_tokenizer(path_or_model)
    saved = Path(path_or_model) / "template.json"  # a merged export carries its template too
    template = Template.load(saved) if saved.is_file() else Template.for_tokenizer(
        tokenizer, template_kind, system_prompt=system_prompt)
    if system_prompt is not None:
        template.system_prompt = system_prompt
    return Loaded(load_model(path_or_model, dtype).eval(), tokenizer, template, None, path_or_model)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """Cut the text at the earliest stop string."""
    cut = len(text)
    for stop in stops:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


def prompt_ids(loaded: Loaded, conversation: Sequence[Message]) -> list[int]:
    return render_conversation(list(conversation), loaded.tokenizer, loaded.template, for_generation=True).input_ids


class StopOnStrings:
    """Stop a row once its new text contains a stop string (decoding only a short tail per step).

    transformers' own `stop_strings` precomputes tables over the whole vocabulary on every
    `generate` call, which costs seconds per batch on a CPU; this check costs microseconds.
    """

    def __init__(self, tokenizer, stops: Sequence[str], prompt_width: int):
        self.tokenizer, self.stops, self.prompt_width = tokenizer, [s for s in stops if s], prompt_width
        self.tail = max((len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in self.stops), default=0) + 2

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stops:
            return done
        new = input_ids[:, self.prompt_width:]
        for row in range(new.shape[0]):
            text = self.tokenizer.decode(new[row, -self.tail:])
            done[row] = any(s in text for s in self.stops)
        return done


@torch.no_grad()
def generate(loaded: Loaded, conversations: Sequence[Sequence[Message]], gen: GenerateSection,
             progress: bool = True) -> list[list[str]]:
    """For each conversation, `num_return_sequences` completions (strings, stop strings cut)."""
    from transformers import GenerationConfig, StoppingCriteriaList

    tokenizer, model = loaded.tokenizer, loaded.model
    stops = list(dict.fromkeys(loaded.template.stop_strings(tokenizer) + list(gen.stop)))
    eos_ids = [i for i in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(tokenizer.eos_token)} if i is not None]
    sample = gen.temperature > 0
    config = GenerationConfig(
        max_new_tokens=gen.max_new_tokens, do_sample=sample,
        temperature=gen.temperature if sample else None, top_k=gen.top_k if sample else None,
        top_p=gen.top_p if sample else None, repetition_penalty=gen.repetition_penalty,
        num_return_sequences=gen.num_return_sequences, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
    )
    device = next(model.parameters()).device
    all_ids = [prompt_ids(loaded, conv) for conv in conversations]
    # longest first: batches of similar length waste less padding
    order = sorted(range(len(all_ids)), key=lambda i: -len(all_ids[i]))
    outputs: list[list[str]] = [[] for _ in all_ids]
    torch.manual_seed(gen.seed)
    bar = tqdm(total=len(all_ids), desc="generate", disable=not progress or len(all_ids) < 2, dynamic_ncols=True)
    for start in range(0, len(order), gen.batch_size):
        chunk = order[start:start + gen.batch_size]
        width = max(len(all_ids[i]) for i in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
            ids[row, width - len(all_ids[i]):] = torch.tensor(all_ids[i])
            mask[row, width - len(all_ids[i]):] = 1
        criteria = StoppingCriteriaList([StopOnStrings(tokenizer, [s for s in stops if s != tokenizer.eos_token], width)])
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                             stopping_criteria=criteria)
        new = out[:, width:]
        texts = tokenizer.batch_decode(new, skip_special_tokens=False)
        for row, text in enumerate(texts):
            i = chunk[row // gen.num_return_sequences]
            text = cut_at_stop(text, stops + [t for t in (tokenizer.pad_token,) if t])
            outputs[i].append(text.strip())
        bar.update(len(chunk))
    bar.close()
    return outputs
