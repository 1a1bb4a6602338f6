"""Augmentation by a language model: back-translation, paraphrase and dialogue extension.

Every method runs through fewtune's own inference path (:func:`fewtune.generate.load_for_inference`
and :func:`fewtune.generate.generate`), so prompts go through the model's chat template exactly as
they would at inference. ``--model`` (``Resources.model``) is loaded once and kept in
``resources.generator``. Each generation call is seeded from the example's ``rng``, so a run is
repeatable.

Back-translation and paraphrase rewrite only the user turns (``augmentable_turns``); the assistant
targets and the label stay. The protected spans are named in the prompt ("keep these phrases
exactly"), but a small model does not always obey: the pipeline rejects candidates that lost one.

Dialogue extension (chat data) has two modes, chosen so that the learned targets stay honest:

- ``vary_user``: one user turn, chosen by the rng, is paraphrased; every assistant turn is kept as
  written. A reworded question with the same meaning keeps its answer valid.
- ``new_turn``: a follow-up user question and the model's reply to it are appended *after* the
  original conversation. The generated reply is the model's own text, not a reference answer, so
  it has loss weight 0 unless ``train_generated`` is set; the original turns keep their weights.
  Examples with a label (classification) are skipped: a label names the answer to the original
  final turn, not to a new one.

Recombination (dropping or reordering earlier exchanges) is left out on purpose: nothing tells
whether a later answer depends on an earlier exchange ("and the other one?"), and a wrong guess
trains an answer to a question that was never asked.
"""

from __future__ import annotations

import random
import re
from pathlib import Path


from fewtune.augment.base import AugmentError, Candidate, Resources, augmentable_turns, with_messages, with_turns
from fewtune.augment.options import BacktranslateOptions, DialogueOptions, ParaphraseOptions
from fewtune.data.formats import Example, Message

NO_MODEL = ("LLM augmentation needs a model: give --model (a run directory, a model folder, a .gguf file "
            "or a hub id), e.g. --model smollm2-135m-instruct")

LANGUAGE_NAMES = {"en": "English", "zh": "Chinese", "de": "German", "fr": "French", "ja": "Japanese"}
DEFAULT_PIVOT = {"zh": "English", "en": "German"}

_PREFIX = re.compile(r"^\s*(paraphrase|rewritten|rewrite|translation|question|answer|output|sentence|user|改写|翻译|译文|句子|问题)"
                     r"\s*[:：]\s*", re.IGNORECASE)
_QUOTES = "\"'“”‘’「」『』`"


# ---------------------------------------------------------------- the model and one call to it


def load_generator(resources: Resources):
    """The model ``--model`` names, loaded once per run."""
    if resources.generator is None:
        if not resources.model:
            raise AugmentError(NO_MODEL)
        from fewtune.generate import load_for_inference

        resources.generator = load_for_inference(resources.model)
    return resources.generator


def sample(loaded, conversations: list[list[Message]], n: int, rng: random.Random, temperature: float,
           top_p: float, max_new_tokens: int) -> list[list[str]]:
    """``n`` completions per conversation, seeded from ``rng`` (same rng state, same texts)."""
    from fewtune.config import GenerateSection
    from fewtune.generate import generate

    gen = GenerateSection(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p if temperature else None,
                          num_return_sequences=n, seed=rng.randrange(2**31), batch_size=8)
    return generate(loaded, conversations, gen, progress=False)


def budget(loaded, text: str, fixed: int | None) -> int:
    """Tokens allowed for a rewrite of ``text``: a rewrite is about as long as its source."""
    if fixed:
        return fixed
    return min(2 * len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"]) + 16, 256)


def clean(text: str) -> str:
    """The rewrite alone: first non-empty line, without a "Paraphrase:" prefix or surrounding quotes."""
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    line = _PREFIX.sub("", line).strip()
    if len(line) >= 2 and line[0] in _QUOTES and line[-1] in _QUOTES:
        line = line[1:-1].strip()
    return line


def text_language(text: str, resources: Resources) -> str:
    if resources.language in ("en", "zh"):
        return resources.language
    from fewtune.quality.textstats import language

    return "en" if language(text) == "en" else "zh"


def keep_list(protected: list[str], text: str) -> str:
    return ", ".join(f'"{s}"' for s in protected if s in text)


# ---------------------------------------------------------------- back-translation


def _translate_prompt(options: BacktranslateOptions, source: str, target: str, keep: str, text: str) -> list[Message]:
    if options.prompt:
        return [Message("user", options.prompt.format(source=source, target=target, keep=keep, text=text))]
    if target == "Chinese":
        system = "你是一名专业翻译。"
        ask = f"把下面的{source}句子翻译成中文。" + (f"这些词语必须原样保留：{keep}。" if keep else "") + \
            f"只输出译文。\n\n{text}"
    else:
        system = "You are a professional translator."
        ask = f"Translate the following {source} sentence into {target}. " + \
            (f"Keep these phrases exactly as they are: {keep}. " if keep else "") + \
            f"Reply with the translation only.\n\n{text}"
    return [Message("system", system), Message("user", ask)]


def _seq2seq_translator(folder: str):
    """(forward, backward): translate(texts, n, rng, options) callables from a local translation model pair."""
    root = Path(folder)
    parts = [root / "to", root / "back"]
    missing = [str(p) for p in parts if not (p / "config.json").is_file()]
    if missing:
        raise AugmentError(f"translator {folder}: expected two model folders to/ (source -> pivot) and back/ "
                           f"(pivot -> source), each with config.json; missing: {', '.join(missing)}")

    def load(path: Path):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True), \
            AutoModelForSeq2SeqLM.from_pretrained(path, local_files_only=True).eval()

    def make(path: Path):
        cached = []

        def translate(texts: list[str], n: int, rng: random.Random, options: BacktranslateOptions) -> list[list[str]]:
            import torch

            if not cached:
                cached.append(load(path))
            tok, model = cached[0]
            torch.manual_seed(rng.randrange(2**31))
            batch = tok(texts, return_tensors="pt", padding=True)
            sample_it = options.temperature > 0
            with torch.no_grad():
                out = model.generate(**batch, do_sample=sample_it, num_return_sequences=n,
                                     num_beams=1 if sample_it else n,
                                     temperature=options.temperature if sample_it else None,
                                     top_p=options.top_p if sample_it else None,
                                     max_new_tokens=options.max_new_tokens or 256)
            decoded = tok.batch_decode(out, skip_special_tokens=True)
            return [decoded[i * n:(i + 1) * n] for i in range(len(texts))]

        return translate

    return make(parts[0]), make(parts[1])


def build_backtranslate(options: BacktranslateOptions, resources: Resources):
    translator = _seq2seq_translator(options.translator) if options.translator else None
    if translator is None and not resources.model and resources.generator is None:
        raise AugmentError(NO_MODEL + ", or give the option translator (a local translation model folder)")

    def round_trip(text: str, n: int, rng: random.Random, protected: list[str]) -> tuple[str, list[str], list[str]]:
        lang = text_language(text, resources)
        source = LANGUAGE_NAMES[lang]
        pivot = LANGUAGE_NAMES.get(options.pivot, options.pivot) if options.pivot else DEFAULT_PIVOT[lang]
        if translator is not None:
            there = translator[0]([text], n, rng, options)[0]
            back = [b[0] for b in translator[1](there, 1, rng, options)]
            return pivot, there, back
        loaded = load_generator(resources)
        keep = keep_list(protected, text)
        limit = budget(loaded, text, options.max_new_tokens)
        there = [clean(t) for t in sample(loaded, [_translate_prompt(options, source, pivot, keep, text)], n, rng,
                                          options.temperature, options.top_p, limit)[0]]
        back_prompts = [_translate_prompt(options, pivot, source, keep, t) for t in there]
        back = [clean(b[0]) for b in sample(loaded, back_prompts, 1, rng, options.temperature, options.top_p,
                                            limit)]
        return pivot, there, back

    def augment(example: Example, n: int, rng: random.Random, protected: list[str]) -> list[Candidate]:
        turns = augmentable_turns(example)
        if not turns or n <= 0:
            return []
        results = {i: round_trip(example.messages[i].content, n, rng, protected) for i in turns}
        out = []
        for j in range(n):
            new = {i: r[2][j] for i, r in results.items() if j < len(r[2]) and r[2][j]}
            if not new:
                continue
            pivots = {r[0] for r in results.values()}
            via = [results[i][1][j] for i in new]
            out.append(Candidate(with_turns(example, new), {"pivot": pivots.pop() if len(pivots) == 1 else sorted(pivots),
                                                            "via": via[0] if len(via) == 1 else via}))
        return out

    return augment


# ---------------------------------------------------------------- paraphrase


def paraphrase_prompt(options: ParaphraseOptions, text: str, lang: str, keep: str) -> list[Message]:
    if options.instruction:
        system = options.instruction.format(keep=keep)
    elif lang == "zh":
        system = ("你是一名改写助手。用不同的说法改写用户的句子，意思完全不变，仍用中文。"
                  + (f"这些词语必须原样保留：{keep}。" if keep else "") + "只输出改写后的一句话。")
    else:
        system = ("You are a paraphrasing assistant. Rewrite the user's sentence in other words with exactly the "
                  "same meaning, in the same language. " + (f"Keep these phrases exactly: {keep}. " if keep else "")
                  + "Reply with the rewritten sentence only.")
    messages = [Message("system", system)]
    for src, para in options.examples:
        messages += [Message("user", src), Message("assistant", para)]
    return messages + [Message("user", text)]


def paraphrases(loaded, options: ParaphraseOptions, text: str, n: int, rng: random.Random, protected: list[str],
                resources: Resources) -> list[str]:
    prompt = paraphrase_prompt(options, text, text_language(text, resources), keep_list(protected, text))
    outs = sample(loaded, [prompt], n, rng, options.temperature, options.top_p,
                  budget(loaded, text, options.max_new_tokens))[0]
    return [clean(o) for o in outs]


def build_paraphrase(options: ParaphraseOptions, resources: Resources):
    if not resources.model and resources.generator is None:
        raise AugmentError(NO_MODEL)

    def augment(example: Example, n: int, rng: random.Random, protected: list[str]) -> list[Candidate]:
        turns = augmentable_turns(example)
        if not turns or n <= 0:
            return []
        loaded = load_generator(resources)
        per_turn = {i: paraphrases(loaded, options, example.messages[i].content, n, rng, protected, resources)
                    for i in turns}
        out = []
        for j in range(n):
            new = {i: texts[j] for i, texts in per_turn.items() if j < len(texts) and texts[j]}
            if new:
                out.append(Candidate(with_turns(example, new), {"turns": sorted(new)}))
        return out

    return augment


# ---------------------------------------------------------------- dialogue extension

FOLLOW_UP = ("You write the user's next message in a conversation with an assistant. Read the conversation and "
             "write one short follow-up question the user might ask next, in the conversation's language. "
             "Reply with the question only.")


def _transcript(messages: list[Message]) -> str:
    return "\n".join(f"{m.role.capitalize()}: {m.content}" for m in messages if m.role in ("user", "assistant"))


def build_dialogue(options: DialogueOptions, resources: Resources):
    unknown = sorted(set(options.modes) - {"vary_user", "new_turn"})
    if unknown or not options.modes:
        raise AugmentError(f"dialogue modes {unknown or '[]'}: use vary_user and/or new_turn")
    if not resources.model and resources.generator is None:
        raise AugmentError(NO_MODEL)
    para = ParaphraseOptions(temperature=options.temperature, top_p=options.top_p)

    def vary_user(example: Example, rng: random.Random, protected: list[str]) -> Candidate | None:
        turns = augmentable_turns(example)
        if not turns:
            return None
        turn = rng.choice(turns)
        text = paraphrases(load_generator(resources), para, example.messages[turn].content, 1, rng, protected,
                           resources)[0]
        return Candidate(with_turns(example, {turn: text}), {"mode": "vary_user", "turn": turn}) if text else None

    def new_turn(example: Example, rng: random.Random) -> Candidate | None:
        if example.label is not None or example.reference is None:
            return None  # a label answers the original last turn; a conversation must end with an answer
        loaded = load_generator(resources)
        asked = [Message("system", FOLLOW_UP), Message("user", _transcript(example.messages))]
        question = clean(sample(loaded, [asked], 1, rng, options.temperature, options.top_p, 48)[0][0])
        if not question:
            return None
        history = list(example.messages) + [Message("user", question)]
        reply = sample(loaded, [history], 1, rng, options.temperature, options.top_p, options.max_new_tokens)[0][0]
        if not reply.strip():
            return None
        weight = None if options.train_generated else 0.0
        messages = [Message(m.role, m.content, m.weight) for m in example.messages]
        messages += [Message("user", question), Message("assistant", reply.strip(), weight)]
        return Candidate(with_messages(example, messages), {"mode": "new_turn", "train_generated": options.train_generated})

    def augment(example: Example, n: int, rng: random.Random, protected: list[str]) -> list[Candidate]:
        out = []
        for j in range(n):
            mode = options.modes[j % len(options.modes)]
            cand = vary_user(example, rng, protected) if mode == "vary_user" else new_turn(example, rng)
            if cand is not None:
                out.append(cand)
        return out

    return augment
