"""Generation with exactly the template used in training.

A run directory carries its template (template.json) and tokenizer, so the prompt built
here is the one :func:`render_conversation` built for training. Prompts are batched with
left padding; stop strings end generation and are cut from the output.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from fewtune import decode
from fewtune.config import Config, GenerateSection, load_config
from fewtune.data.formats import Message
from fewtune.data.render import Template, render_conversation
from fewtune.models import EMBEDDED, ModelNotFoundError, load_model, load_tokenizer
from fewtune.vision import vision_for
from fewtune.runinfo import MARKER, check_run_format

log = logging.getLogger(__name__)


class RunDirError(ValueError):
    """A run directory that cannot be read: a file missing or damaged. Worded for the user, with the path."""


class PromptError(ValueError):
    """A prompt that cannot be generated from: empty, or too long for the model's context."""


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    template: Template
    config: Config | None  # the run's config, when loaded from a run directory
    source: str
    precision: str = "no"  # what the weights run in: "no" (float32), "bf16" (fewtune.inference_precision)
    precision_reason: str = ""
    vision: object = None  # a vision-language model's image handling (fewtune.vision.Vision), else None


class PromptIds(list):
    """A rendered prompt's token ids, with the images whose tokens are among them (in order)."""

    images: tuple[str, ...] = ()


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.yaml").is_file() and (path / "template.json").is_file()


# what only `fewtune train` writes into a folder (a model folder, a merged export included, has config.json)
RUN_FILES = ("config.yaml", MARKER, "template.json", "adapter", "checkpoints")


def looks_like_run_dir(path: str | Path) -> bool:
    """A folder `fewtune train` wrote, whole or damaged: what readers check before trusting it."""
    path = Path(path)
    return path.is_dir() and not (path / "config.json").is_file() and any((path / f).exists() for f in RUN_FILES)


def read_template(path: str | Path) -> Template:
    """template.json, or RunDirError naming the file when it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"{path} is missing: the run directory is incomplete (generation needs the template "
                          "the run was trained with)")
    try:
        return Template.load(path)
    except UnicodeDecodeError:
        raise RunDirError(f"{path} is damaged: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise RunDirError(f"{path} is damaged: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except TypeError as err:  # a JSON value that is not an object, or keys Template does not have
        raise RunDirError(f"{path} is damaged: not a fewtune template ({err})") from None


def check_run_dir(run: str | Path, for_inference: bool = True) -> tuple[Config, Template | None]:
    """What every reader of a run directory calls first: the format marker, config.yaml and, for loading
    the model (``for_inference``), template.json and tokenizer/.

    Raises RunFormatError (a newer fewtune wrote it), RunDirError (a file missing or damaged) or
    ConfigError (config.yaml unreadable); each names the path and fits on one line.
    """
    run = Path(run)
    if not run.is_dir():
        raise NotADirectoryError(f"{run} is not a run directory" + ("" if run.exists() else " (it does not exist)"))
    check_run_format(run)
    if not (run / "config.yaml").is_file():
        raise RunDirError(f"{run / 'config.yaml'} is missing: the run directory is incomplete or damaged")
    cfg = load_config(run / "config.yaml")
    if not for_inference:
        return cfg, None
    template = read_template(run / "template.json")
    if not (run / "tokenizer" / "tokenizer_config.json").is_file():
        raise RunDirError(f"{run / 'tokenizer'} is missing or incomplete: the run directory is damaged")
    return cfg, template


def _looks_like_path(name: str) -> bool:
    """A name no hub id can be: absolute, ./ ../ ~, or more than one folder deep (hub ids are org/name)."""
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
            or Path(name).suffix.lower() in (".gguf", ".json", ".jsonl", ".yaml", ".yml", ".csv", ".txt"))


def check_target(path_or_model: str) -> None:
    """Refuse, before loading anything, a target that cannot be a run, a model folder, a .gguf file or a hub id."""
    path = Path(path_or_model).expanduser()
    if looks_like_run_dir(path):
        check_run_dir(path)
        return
    if path_or_model in EMBEDDED:
        return
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise ModelNotFoundError(f"{path} is a file, not a run directory, model folder or .gguf file")
    if not path.exists() and _looks_like_path(path_or_model):
        raise ModelNotFoundError(f"{path} does not exist: give a run directory, a model folder, a .gguf file, "
                                 f"an embedded model ({', '.join(EMBEDDED)}) or a hub id")


def _damaged(part: Path, err: BaseException) -> RunDirError:
    cause = err.__cause__ if isinstance(err, ModelNotFoundError) and err.__cause__ is not None else err
    first = " ".join(str(cause).split())[:200]
    return RunDirError(f"{part} cannot be loaded ({type(cause).__name__}: {first}): the run directory is damaged")


def load_for_inference(path_or_model: str, template_kind: str = "auto", system_prompt: str | None = None,
                       dtype: str = "auto", merge: bool = False, precision: str = "auto") -> Loaded:
    """A run directory (base + adapter, or full model) or any model name/folder/.gguf.

    ``merge=True`` folds a weight adapter (LoRA, DoRA, IA3) into the base weights in memory:
    the same outputs (within float rounding) without the adapter's extra matrix products,
    which matters on a CPU. Prompt-learning adapters (virtual tokens) stay as they are.
    ``precision`` (auto, no, bf16) is what the weights run in after loading and merging: auto is
    the run's training precision, or for another model what runs faster here
    (:mod:`fewtune.inference_precision`); a ``dtype`` other than auto loads and stays in that dtype.
    """
    loaded = _load(path_or_model, template_kind, system_prompt, dtype, merge)
    contiguous_head_input(loaded.model)
    if dtype == "auto" and (loaded.config is None or loaded.config.model.dtype == "auto"):
        from fewtune import inference_precision

        name = loaded.config.model.name if loaded.config is not None else path_or_model
        run = loaded.source if loaded.config is not None else None
        choice, loaded.model = inference_precision.resolve(precision, loaded.model, name, run)
        loaded.precision, loaded.precision_reason = choice.precision, choice.reason
    from fewtune.gqa_attention import use_gqa_attention

    use_gqa_attention(loaded.model)  # after the precision choice: it may have replaced the model
    return loaded


def contiguous_head_input(model) -> None:
    """Make the output layer's input contiguous before its product.

    ``logits_to_keep`` hands the output layer a slice of the hidden states (the last column of a
    batch), and PyTorch's CPU matmul runs a 3-D strided input against weights that need no gradient
    (a loaded model for inference) as a batched product over a copy of the whole weight per row: for
    a 49k vocabulary, 32 rows took 2 s in bf16 and 0.09 s in fp32, against 6 and 12 ms contiguous.
    Every prefill of generation and every prompt pass of choice scoring goes through it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_fewtune_contiguous_input", False):
        return
    head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]) if args else args)
    head._fewtune_contiguous_input = True


def _load(path_or_model: str, template_kind: str, system_prompt: str | None, dtype: str, merge: bool) -> Loaded:
    if looks_like_run_dir(path_or_model):
        run = Path(path_or_model)
        cfg, template = check_run_dir(run)  # (what check_target does for a run directory)
        # the run's own folders failing to load (a damaged JSON or weights file, whatever the library
        # raises for it) is a damaged run directory; the base model named in the config is not caught
        try:
            tokenizer = load_tokenizer(str(run / "tokenizer"))
        except Exception as err:
            raise _damaged(run / "tokenizer", err) from None
        if (run / "adapter").is_dir():
            from peft import PeftModel

            base = load_model(cfg.model.name, dtype if dtype != "auto" else cfg.model.dtype)
            try:
                model = PeftModel.from_pretrained(base, str(run / "adapter"))
            except Exception as err:
                raise _damaged(run / "adapter", err) from None
            if merge:
                from fewtune.methods import is_prompt_learning

                if not is_prompt_learning(model):
                    model = model.merge_and_unload()
        elif (run / "model").is_dir():
            try:
                model = load_model(str(run / "model"), dtype)
            except Exception as err:
                raise _damaged(run / "model", err) from None
        else:
            raise FileNotFoundError(f"{run} has no adapter/ or model/ folder: the run did not finish. "
                                    f"Resume it with: fewtune train --resume {run}")
        if system_prompt is not None and template is not None:  # asked for explicitly: e.g. a run whose
            template.system_prompt = system_prompt  # examples carried their system message in the data
        vision = vision_for(cfg.model.name, str(run / "tokenizer"), cfg.model.vision)
        return Loaded(model.eval(), tokenizer, template, cfg, str(run), vision=vision)
    check_target(path_or_model)
    tokenizer = load_tokenizer(path_or_model)
    saved = Path(path_or_model) / "template.json"  # a merged export carries its template too
    template = read_template(saved) if saved.is_file() else Template.for_tokenizer(
        tokenizer, template_kind, system_prompt=system_prompt)
    if system_prompt is not None:
        template.system_prompt = system_prompt
    return Loaded(load_model(path_or_model, dtype).eval(), tokenizer, template, None, path_or_model,
                  vision=vision_for(path_or_model))


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """Cut the text at the earliest stop string."""
    cut = len(text)
    for stop in stops:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


@contextlib.contextmanager
def prefix_tuning_cache(model):
    """Make ``model.generate`` of a peft prompt-learning model (prefix tuning, prompt tuning, P-tuning) continue
    what the training forward computes.

    peft tells the first generation step from later ones by ``past_key_values``, which transformers 5.x's
    generation loop no longer fills (it passes its cache as ``cache``). So peft treated every step as the first:
    prefix tuning handed its prefix over as ``past_key_values`` each step, and the model, given both, kept the
    loop's empty ``cache`` (the prefix was dropped: the run generated as its base model); prompt and P-tuning
    put their virtual tokens in front of every new token again (from the second token on, the scores drifted from
    the forward's). While this is open, a forward hook takes the prefix as the first cache and drops peft's later
    copies, and drops the re-added virtual tokens once the cache holds them."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    kind = str(getattr(config, "peft_type", "")).rsplit(".", 1)[-1]
    if kind not in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"):
        yield
        return
    virtual = int(config.num_virtual_tokens)

    def hook(module, args, kwargs):
        if "cache" not in kwargs:
            return None
        kwargs = dict(kwargs)
        cache = kwargs["cache"]
        started = cache is not None and cache.get_seq_length() > 0
        prefix = kwargs.pop("past_key_values", None)
        if prefix is not None and not started:
            kwargs["cache"] = prefix
        embeds = kwargs.get("inputs_embeds")
        if started and embeds is not None and embeds.shape[1] > virtual and kind != "PREFIX_TUNING":
            kwargs["inputs_embeds"] = embeds[:, virtual:]
            if kwargs.get("position_ids") is not None and kwargs["position_ids"].shape[-1] == embeds.shape[1]:
                kwargs["position_ids"] = kwargs["position_ids"][..., virtual:]
        return args, kwargs

    handle = model.get_base_model().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def prompt_ids(loaded: Loaded, conversation: Sequence[Message]) -> list[int]:
    """The prompt's ids as training rendered them (a :class:`PromptIds` carrying its images, if it has any)."""
    if loaded.vision is None and any(m.images for m in conversation):
        raise PromptError(f"the prompt has images but {loaded.source} is a text-only model")
    rendered = render_conversation(list(conversation), loaded.tokenizer, loaded.template, for_generation=True,
                                   vision=loaded.vision)
    if not rendered.images:
        return rendered.input_ids
    ids = PromptIds(rendered.input_ids)
    ids.images = rendered.images
    return ids


# ---------------------------------------------------------------- prompts that cannot be answered
#
# Policy (the CLI, eval and any server share it): a prompt whose last message is empty or only
# whitespace is refused; so is one whose rendered tokens plus max_new_tokens exceed the model's
# context. Nothing is truncated silently: cutting a prompt changes what is asked. `chat` instead
# drops its oldest turns (fit_history), and refuses only a message that alone does not fit.

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_limit(loaded: Loaded) -> int | None:
    """Tokens the model can attend to: its config's positions, or the tokenizer's model_max_length when
    that is smaller (and not transformers' 'unknown' placeholder); less any virtual tokens a prompt-learning
    adapter puts in front. None when neither says."""
    config = getattr(loaded.model, "config", None)
    limits = [n for n in (getattr(config, k, None) for k in CONTEXT_KEYS) if isinstance(n, int) and n > 0][:1]
    tok_max = getattr(loaded.tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 10_000_000:
        limits.append(tok_max)
    if not limits:
        return None
    limit = min(limits)
    peft_config = getattr(loaded.model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        limit -= int(getattr(peft_config, "num_virtual_tokens", 0) or 0)
    return limit


def is_empty(conversation: Sequence[Message]) -> bool:
    return not conversation or not conversation[-1].content.strip()


def too_long(name: str, n_tokens: int, max_new_tokens: int, limit: int) -> str:
    """The one line that refuses a prompt over the context, with what to do (token counts include the template)."""
    if max_new_tokens >= limit:
        return (f"{name}: --max-new-tokens {max_new_tokens} alone fills the model's context of {limit} tokens (the "
                f"prompt is {n_tokens} tokens with the template): lower --max-new-tokens")
    if n_tokens >= limit:
        return (f"{name} is {n_tokens} tokens with the template, over the model's context of {limit} tokens by "
                f"itself: shorten it to at most {limit - max_new_tokens} tokens")
    return (f"{name} is {n_tokens} tokens with the template; with --max-new-tokens {max_new_tokens} that makes "
            f"{n_tokens + max_new_tokens}, over the model's context of {limit} tokens: shorten the prompt by "
            f"{n_tokens + max_new_tokens - limit} tokens or lower --max-new-tokens to {limit - n_tokens}")


def _more(count: int, what: str) -> str:
    return f" ({count} more prompt{'s are' if count > 1 else ' is'} {what} too)" if count else ""


def check_prompts(loaded: Loaded | None, conversations: Sequence[Sequence[Message]], max_new_tokens: int,
                  names: Sequence[str] | None = None) -> list[list[int]]:
    """The prompts' token ids, or PromptError naming the first empty prompt or the first that does not fit.

    ``names`` say which prompt is which to the user ("--prompt 2", "prompts.jsonl line 7"; default
    "prompt N"). With ``loaded`` None only emptiness is checked (it needs no model) and [] is returned.
    """
    names = list(names) if names is not None else [f"prompt {i + 1}" for i in range(len(conversations))]
    empty = [i for i, c in enumerate(conversations) if is_empty(c)]
    if empty:
        raise PromptError(f"{names[empty[0]]} is empty: give some text to answer{_more(len(empty) - 1, 'empty')}")
    if loaded is None:
        return []
    ids = [prompt_ids(loaded, c) for c in conversations]
    limit = context_limit(loaded)
    if limit is not None:
        over = [i for i, x in enumerate(ids) if len(x) + max_new_tokens > limit]
        if over:
            i = over[0]
            raise PromptError(too_long(names[i], len(ids[i]), max_new_tokens, limit) + _more(len(over) - 1, "too long"))
    return ids


def fit_history(loaded: Loaded, history: Sequence[Message], max_new_tokens: int,
                name: str = "the message") -> tuple[list[Message], int]:
    """A chat history that fits the context with room for ``max_new_tokens``, and how many turns were dropped.

    The oldest turns (a user message and the reply to it) go first; system messages stay. When
    the last user message does not fit even alone, PromptError says so (the caller drops it).
    """
    limit = context_limit(loaded)
    system = [m for m in history if m.role == "system"]
    turns = [m for m in history if m.role != "system"]
    dropped = 0
    while True:
        conversation = system + turns
        if limit is None:
            return conversation, dropped
        n = len(prompt_ids(loaded, conversation))
        if n + max_new_tokens <= limit:
            return conversation, dropped
        if len(turns) <= 1:
            raise PromptError(too_long(name, n, max_new_tokens, limit))
        cut = 1  # past the oldest user message and every reply to it
        while cut < len(turns) - 1 and turns[cut].role != "user":
            cut += 1
        turns = turns[cut:]
        dropped += 1


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


@dataclass
class Completion:
    """One generated output: its text (stop strings cut), the tokens generated for it, and why it ended
    ("stop": an end-of-turn token or a stop string; "length": ``max_new_tokens`` reached)."""

    text: str
    tokens: int
    finish_reason: str


def generate(loaded: Loaded, conversations: Sequence[Sequence[Message]], gen: GenerateSection,
             progress: bool = True, names: Sequence[str] | None = None) -> list[list[str]]:
    """For each conversation, `num_return_sequences` completions (strings, stop strings cut).

    Empty prompts and prompts that do not fit the context with ``gen.max_new_tokens`` raise
    PromptError before anything is generated (``names``: how to call each prompt in that message).
    """
    all_ids = check_prompts(loaded, conversations, gen.max_new_tokens, names)
    return [[c.text for c in row] for row in generate_ids(loaded, all_ids, gen, progress)]


@torch.no_grad()
def generate_ids(loaded: Loaded, all_ids: Sequence[list[int]], gen: GenerateSection, progress: bool = False,
                 on_step: Callable[[list[tuple[int, int]], list[int]], None] | None = None) -> list[list[Completion]]:
    """:func:`generate` on prompts already rendered (and checked), with token counts and finish reasons.

    ``on_step(outputs, tokens)`` receives after each decoding step the outputs still running, as
    (prompt index, sequence index) pairs, and the token each just got (models that ``fewtune.decode``
    does not cover report every token once their batch is done)."""
    from transformers import GenerationConfig, StoppingCriteriaList

    tokenizer, model = loaded.tokenizer, loaded.model
    stops = list(dict.fromkeys(loaded.template.stop_strings(tokenizer) + list(gen.stop)))
    cut = stops + [t for t in (tokenizer.pad_token,) if t]
    eos_ids = [i for i in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(tokenizer.eos_token)} if i is not None]
    sample = gen.temperature > 0
    n_seq = gen.num_return_sequences
    config = GenerationConfig(
        max_new_tokens=gen.max_new_tokens, do_sample=sample,
        temperature=gen.temperature if sample else None, top_k=gen.top_k if sample else None,
        top_p=gen.top_p if sample else None, repetition_penalty=gen.repetition_penalty,
        num_return_sequences=n_seq, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
    )
    device = next(model.parameters()).device
    # longest first: batches of similar length waste less padding
    order = sorted(range(len(all_ids)), key=lambda i: -len(all_ids[i]))
    outputs: list[list[Completion]] = [[] for _ in all_ids]
    torch.manual_seed(gen.seed)
    # fewtune's decoding loop (fewtune.decode): the prefix every prompt shares runs once, finished rows leave
    # the batch; models it does not cover go through model.generate
    images = [tuple(getattr(ids, "images", ())) for ids in all_ids]
    own_loop = decode.supported(model) and not any(images)
    n_prefix = decode.common_prefix(all_ids) if own_loop and len(all_ids) > 1 else 0
    prefix_layers = decode.prefix_cache(model, all_ids[0][:n_prefix]) if n_prefix else None
    string_stops = [s for s in stops if s != tokenizer.eos_token]

    def completion(tokens: list[int]) -> Completion:
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        ended = (tokens and tokens[-1] in eos_ids) or len(tokens) < gen.max_new_tokens or cut_at_stop(text, cut) != text
        return Completion(cut_at_stop(text, cut).strip(), len(tokens), "stop" if ended else "length")

    bar = tqdm(total=len(all_ids), desc="generate", disable=not progress or len(all_ids) < 2, dynamic_ncols=True)
    for start in range(0, len(order), gen.batch_size):
        chunk = order[start:start + gen.batch_size]
        width = max(len(all_ids[i]) for i in chunk)
        report = None
        if on_step is not None:
            def report(rows, tokens, chunk=chunk):
                on_step([(chunk[r // n_seq], r % n_seq) for r in rows], tokens)
        if own_loop:
            check = StopOnStrings(tokenizer, string_stops, width)
            new_ids = decode.decode(
                model, [all_ids[i] for i in chunk], prefix_layers, n_prefix, max_new_tokens=gen.max_new_tokens,
                eos_ids=eos_ids, pad_id=tokenizer.pad_token_id, temperature=gen.temperature,
                top_k=gen.top_k if sample else None, top_p=gen.top_p if sample else None,
                repetition_penalty=gen.repetition_penalty, num_return_sequences=n_seq,
                stop=(lambda seqs, w: check(seqs, None)) if string_stops else None, on_step=report)
        else:
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[row, width - len(all_ids[i]):] = torch.tensor(all_ids[i])
                mask[row, width - len(all_ids[i]):] = 1
            criteria = StoppingCriteriaList([StopOnStrings(tokenizer, string_stops, width)])
            pixels = {}
            refs = [ref for i in chunk for ref in images[i]]
            if refs:  # a vision-language model: the chunk's images, in the order their tokens appear
                pixels = loaded.vision.batch_inputs(ids, refs, [len(images[i]) for i in chunk])
                pixels = {k: v.to(device) for k, v in pixels.items()}
            with prefix_tuning_cache(model):
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=config, stopping_criteria=criteria, **pixels)
            new_ids = []
            for row in out[:, width:].tolist():  # what follows the first end-of-turn token is padding
                end = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
                new_ids.append(row[:end])
            if report is not None:
                for r, tokens in enumerate(new_ids):
                    for t in tokens:
                        report([r], [t])
        for row, tokens in enumerate(new_ids):
            outputs[chunk[row // n_seq]].append(completion(tokens))
        bar.update(len(chunk))
    bar.close()
    return outputs
