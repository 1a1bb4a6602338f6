"""Rendered (tokenized) sets cached on disk, so resumed runs, sweeps and k-fold runs tokenize once.

The key is a hash of everything the result depends on: the examples themselves, the
tokenizer (its full serialized vocabulary and chat template), the prompt template, the
data settings that rendering reads, and the source of the rendering code. Any change to
one of them is a different key, so a stale entry is never read. Entries live under
``$FEWTUNE_CACHE/rendered`` (default ``~/.cache/fewtune/rendered``), a few MB each.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from fewtune.config import DataSection
from fewtune.data import dataset as dataset_module
from fewtune.data import render as render_module
from fewtune.data.dataset import RenderedSet, render_set
from fewtune.data.formats import Example
from fewtune.data.render import Rendered, Template

log = logging.getLogger(__name__)
VERSION = 1


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token,
                         str(tokenizer.special_tokens_map)], default=str).encode())
    return h.hexdigest()


def _code_fingerprint() -> str:
    h = hashlib.sha256()
    for module in (render_module, dataset_module):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def cache_key(examples: list[Example], tokenizer, template: Template, data: DataSection, what: str) -> str:
    h = hashlib.sha256(f"v{VERSION}|{what}|{data.max_length}|{data.prompt_loss_weight}|{data.on_bad_example}".encode())
    h.update(json.dumps(asdict(template), sort_keys=True).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(_code_fingerprint().encode())
    for e in examples:
        h.update(json.dumps([[m.role, m.content, m.weight] for m in e.messages], ensure_ascii=False).encode())
    return h.hexdigest()[:32]


def _cache_dir() -> Path:
    from fewtune.models import cache_dir

    return cache_dir() / "rendered"


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_render_set(examples: list[Example], tokenizer, template: Template, data: DataSection, what: str,
                      use_cache: bool = True, vision=None) -> RenderedSet:
    """``render_set`` with its result kept on disk; errors (bad examples) are raised as before. Sets with
    images are rendered afresh (their token counts depend on the image files, not only on the text)."""
    if not use_cache or not examples or any(m.images for e in examples for m in e.messages):
        return render_set(examples, tokenizer, template, data, what, vision)
    path = _cache_dir() / f"{cache_key(examples, tokenizer, template, data, what)}.json"
    if path.exists():
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            by_index = dict(enumerate(examples))
            out = RenderedSet(
                [Rendered(*row) for row in payload["items"]], [by_index[i] for i in payload["kept"]],
                [(by_index[i], reason) for i, reason in payload["dropped"]], payload["partly_truncated"])
            log.info("%d %s examples: token ids from the cache (%s)", len(out.items), what, path.name)
            if out.dropped:
                log.warning("dropped %d %s example(s) with nothing to learn (first: %s:%d: %s)", len(out.dropped),
                            what, out.dropped[0][0].source, out.dropped[0][0].line, out.dropped[0][1])
            if out.partly_truncated:
                log.warning("%d %s example(s) were cut at max_length=%d and lose part of their completion",
                            out.partly_truncated, what, data.max_length)
            return out
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring unreadable render cache %s (%s)", path, err)
    out = render_set(examples, tokenizer, template, data, what)
    index_of = {id(e): i for i, e in enumerate(examples)}
    payload = {"items": [[r.input_ids, r.loss_weights, r.truncated, r.trainable_before_truncation] for r in out.items],
               "kept": [index_of[id(e)] for e in out.examples],
               "dropped": [[index_of[id(e)], reason] for e, reason in out.dropped],
               "partly_truncated": out.partly_truncated}
    try:
        _write(path, payload)
    except OSError as err:
        log.warning("could not write the render cache %s (%s)", path, err)
    return out
