"""The one render function: a conversation becomes ``(input_ids, loss_weights)``.

Training, evaluation and generation all go through :func:`render_conversation`, so the
prompt a model is trained on and the prompt it is given at inference cannot drift apart.

How: the conversation is cut into text segments at the start and end of every assistant
turn (using the chat template's own output for each prefix of the conversation, or the
plain template's separator and stop). Each segment is tokenized on its own and the
pieces are concatenated. A generation prompt is the same segments up to the start of the
final assistant turn, so its token ids are, by construction, a prefix of the training ids.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from fewtune.data.formats import TEXT_ROLE, Example, Message
from fewtune.data.images import IMAGE_PLACEHOLDER


class RenderError(ValueError):
    pass


@dataclass
class Template:
    """How conversations are laid out in tokens. Saved as template.json with every run."""

    kind: str = "chat"  # "chat": the tokenizer's chat template; "plain": separator and stop
    separator: str = "\n\n###\n\n"  # plain: ends every prompt
    stop: str = " END"  # plain: ends every completion
    system_prompt: str | None = None  # used when a conversation has no system message
    chat_template: str | None = None  # the Jinja template used (kept with the run)

    @classmethod
    def for_tokenizer(cls, tokenizer, kind: str = "auto", separator: str = "\n\n###\n\n", stop: str = " END",
                      system_prompt: str | None = None) -> "Template":
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if kind == "auto":
            kind = "chat" if has_chat else "plain"
        if kind == "chat" and not has_chat:
            raise RenderError("model.template is 'chat' but this tokenizer has no chat template; use 'plain'")
        if kind == "plain" and (not separator or not stop):
            raise RenderError("the plain template needs a non-empty separator and stop")
        return cls(kind, separator, stop, system_prompt, tokenizer.chat_template if kind == "chat" else None)

    @classmethod
    def from_config(cls, tokenizer, cfg, kind: str | None = None) -> "Template":
        """The template a config trains with: model.template (or ``kind``), its separator and stop, and
        data.system_prompt. Every stage that renders from a config builds it here."""
        return cls.for_tokenizer(tokenizer, kind or cfg.model.template, cfg.model.separator, cfg.model.stop,
                                 cfg.data.system_prompt)

    def stop_strings(self, tokenizer) -> list[str]:
        """Strings that end a completion at inference (cut from the output)."""
        if self.kind == "plain":
            return [self.stop]
        return [t for t in {tokenizer.eos_token} if t]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), ensure_ascii=False, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Template":
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def shared_system_message(examples) -> str | None:
    """The system message every example opens with, when they all carry the same one (None otherwise)."""
    texts = {e.messages[0].content if e.messages and e.messages[0].role == "system" else None for e in examples}
    return texts.pop() if len(texts) == 1 else None


@dataclass
class Rendered:
    input_ids: list[int]
    loss_weights: list[float]
    truncated: bool = False  # tokens were cut at max_length
    trainable_before_truncation: float = 0.0
    completion_tokens: int = 0  # tokens of assistant turns with weight > 0 that survived truncation
    completion_tokens_before_truncation: int = 0
    images: tuple[str, ...] = ()  # the images whose tokens are in input_ids, in order
    vision: object = field(default=None, repr=False, compare=False)  # fewtune.vision.Vision that makes their pixels

    def __len__(self) -> int:
        return len(self.input_ids)


def _with_system(messages: Sequence[Message], template: Template) -> list[Message]:
    msgs = list(messages)
    if template.system_prompt and not (msgs and msgs[0].role == "system"):
        msgs.insert(0, Message("system", template.system_prompt))
    return msgs


def _content_parts(message: Message) -> str | list[dict]:
    """A message as the chat template takes it: its text, or for a message with images the content parts
    (``{"type": "image"}`` where each placeholder stands) that vision-language templates expand."""
    if not message.images:
        return message.content
    parts: list[dict] = []
    for i, text in enumerate(message.content.split(IMAGE_PLACEHOLDER)):
        if i:
            parts.append({"type": "image"})
        if text:
            parts.append({"type": "text", "text": text})
    return parts


def _chat_text(tokenizer, template: Template, messages: Sequence[Message], generation_prompt: bool) -> str:
    as_dicts = [{"role": m.role, "content": _content_parts(m)} for m in messages]
    return tokenizer.apply_chat_template(as_dicts, chat_template=template.chat_template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _chat_segments(tokenizer, template: Template, msgs: list[Message], for_generation: bool,
                   prompt_weight: float) -> list[tuple[str, float, bool]]:
    """(text, loss weight, is an assistant turn) pieces of the chat-template rendering."""
    segments: list[tuple[str, float, bool]] = []
    done = ""  # template text covered by segments so far

    def take(upto: str, weight: float, what: str, is_completion: bool = False) -> None:
        nonlocal done
        if not upto.startswith(done):
            raise RenderError(
                f"the chat template does not render this conversation prefix-consistently ({what}): "
                "rendering the first turns is not a prefix of rendering more turns, so training "
                "and inference prompts could differ. Use model.template=plain or another template.")
        if len(upto) > len(done):
            segments.append((upto[len(done):], weight, is_completion))
        done = upto

    for i, message in enumerate(msgs):
        if message.role != "assistant":
            continue
        take(_chat_text(tokenizer, template, msgs[:i], True), prompt_weight, f"before turn {i}")
        weight = 1.0 if message.weight is None else message.weight
        take(_chat_text(tokenizer, template, msgs[: i + 1], False), weight, f"turn {i}", True)
    if for_generation:
        take(_chat_text(tokenizer, template, msgs, True), prompt_weight, "generation prompt")
    elif msgs and msgs[-1].role != "assistant":
        take(_chat_text(tokenizer, template, msgs, False), prompt_weight, "tail")
    return segments


def _plain_segments(template: Template, msgs: list[Message], for_generation: bool,
                    prompt_weight: float) -> list[tuple[str, float, bool]]:
    segments: list[tuple[str, float, bool]] = []
    pending = ""  # prompt text waiting for the next assistant turn
    for message in msgs:
        if message.role == "system":
            pending += message.content + "\n\n"
        elif message.role == "assistant":
            segments.append((pending + template.separator, prompt_weight, False))
            weight = 1.0 if message.weight is None else message.weight
            segments.append((message.content + template.stop, weight, True))
            pending = "\n"
        else:
            pending += message.content if pending in ("", "\n") or pending.endswith("\n\n") else "\n" + message.content
    if for_generation:
        segments.append((pending + template.separator, prompt_weight, False))
    elif pending.strip():
        segments.append((pending, prompt_weight, False))
    return segments


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def _text_ids(tokenizer, text: str, end: bool = True) -> list[int]:
    """A raw-text document as a pretraining stream: BOS where the tokenizer adds one, the text, EOS (``end``)."""
    ids = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    if end and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def _text_rendered(ids: list[int], bos: int | None, truncated: bool = False, before: int | None = None) -> Rendered:
    weights = [0.0 if i == 0 and t == bos else 1.0 for i, t in enumerate(ids)]
    trained = len(ids) - 1  # every token but the first is predicted by the one before it
    return Rendered(ids, weights, truncated, float(sum(weights)), trained, trained if before is None else before)


def render_text_chunks(text: str, tokenizer, max_length: int | None) -> list[Rendered]:
    """A raw-text document (format text) in consecutive pieces of at most ``max_length`` tokens, every token
    carrying loss: a long document is cut into several training items, none of it dropped. A last piece of a
    single token (nothing to predict) is left out."""
    ids = _text_ids(tokenizer, text)
    step = max_length or len(ids)
    bos = tokenizer.bos_token_id if ids and ids[0] == tokenizer.bos_token_id and _adds_bos(tokenizer) else None
    return [_text_rendered(ids[i:i + step], bos) for i in range(0, len(ids), step) if len(ids[i:i + step]) >= 2]


def _expand_images(ids: list[int], weights: list[float], completion: list[bool], images: list[str],
                   vision) -> tuple[list[int], list[float], list[bool], list[tuple[int, int]]]:
    """Each image token the template wrote replaced by the ids the model takes for that image (weight 0):
    Qwen2-VL's image token once per merged patch, Idefics3's marked tiles. Returns them with each image's
    (start, end) span."""
    marks = [i for i, t in enumerate(ids) if t == vision.image_token_id]
    if len(marks) != len(images):
        raise RenderError(f"the chat template wrote {len(marks)} image token(s) for {len(images)} image(s): it does "
                          "not render image parts the way this model's processor expects")
    out_ids: list[int] = []
    out_w: list[float] = []
    out_c: list[bool] = []
    spans: list[tuple[int, int]] = []
    last = 0
    for mark, ref in zip(marks, images):
        out_ids += ids[last:mark]
        out_w += weights[last:mark]
        out_c += completion[last:mark]
        image = vision.image_ids(ref)
        n = len(image)
        spans.append((len(out_ids), len(out_ids) + n))
        out_ids += image
        out_w += [0.0] * n
        out_c += [False] * n
        last = mark + 1
    return out_ids + ids[last:], out_w + weights[last:], out_c + completion[last:], spans


def render_conversation(
    messages: Sequence[Message] | Example,
    tokenizer,
    template: Template,
    max_length: int | None = None,
    prompt_loss_weight: float = 0.0,
    for_generation: bool = False,
    vision=None,
) -> Rendered:
    """Token ids and per-token loss weights for a conversation.

    ``for_generation`` drops a final assistant turn (the reference) and ends with the
    prompt the model continues from. Assistant tokens weigh 1 (or the message's own
    ``weight``), everything else ``prompt_loss_weight``. Sequences longer than
    ``max_length`` are cut on the right; generation prompts are never cut. A raw-text example
    (format text) is its text with BOS/EOS and no template, every token trained (training cuts long
    ones into pieces instead: :func:`render_text_chunks`).

    Messages with images need ``vision`` (``fewtune.vision.Vision``, the model's image handling) and the
    chat template: each image's token becomes the ids the model takes for that image, with weight 0, and
    ``images`` lists the images that made it into ``input_ids`` (a cut never splits an image: it moves to
    the image's start).
    """
    if isinstance(messages, Example):
        messages = messages.messages
    if len(messages) == 1 and messages[0].role == TEXT_ROLE:  # raw text: no template, every token trained
        ids = _text_ids(tokenizer, messages[0].content, end=not for_generation)
        bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
        if max_length is not None and not for_generation and len(ids) > max_length:
            return _text_rendered(ids[:max_length], bos, True, len(ids) - 1)
        return _text_rendered(ids, bos)
    msgs = _with_system(messages, template)
    if for_generation and msgs and msgs[-1].role == "assistant":
        msgs = msgs[:-1]
    if not msgs:
        raise RenderError("empty conversation")
    images = [ref for m in msgs for ref in m.images]
    if images and template.kind != "chat":
        raise RenderError("examples with images need the model's chat template (model.template: chat or auto)")
    if images and vision is None:
        raise RenderError(f"this conversation has {len(images)} image(s) but the model is text-only (no image "
                          "processor): use a vision-language model, or data without images")
    if template.kind == "chat":
        segments = _chat_segments(tokenizer, template, msgs, for_generation, prompt_loss_weight)
        ids: list[int] = []
        weights: list[float] = []
    else:
        segments = _plain_segments(template, msgs, for_generation, prompt_loss_weight)
        ids = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
        weights = [0.0] * len(ids)
    completion = [False] * len(ids)
    for text, weight, is_completion in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        weights.extend([float(weight)] * len(piece))
        completion.extend([is_completion and weight > 0] * len(piece))
    spans: list[tuple[int, int]] = []
    if images:
        ids, weights, completion, spans = _expand_images(ids, weights, completion, images, vision)
    total = sum(weights)
    n_completion = sum(completion)
    truncated = False
    if max_length is not None and not for_generation and len(ids) > max_length:
        cut = max_length
        for start, end in spans:  # an image is whole or not there: its features fill every one of its positions
            if start < cut < end:
                cut = start
        ids, weights, completion, truncated = ids[:cut], weights[:cut], completion[:cut], True
        images = [ref for ref, (_, end) in zip(images, spans) if end <= cut]
    return Rendered(ids, weights, truncated, total, sum(completion[1:]), n_completion, tuple(images),
                    vision if images else None)
