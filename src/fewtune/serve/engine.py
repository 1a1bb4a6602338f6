"""The models a server answers with, and the worker that batches their requests.

Several runs fine-tuned from the same base model share one copy of it: the first run's adapter is
loaded with the base, the others' adapters are added beside it (peft ``load_adapter``), and each
batch switches to its adapter. A single run (or a plain model) is merged instead, which is faster.

Requests go into a bounded queue (a full queue is the caller's cue to answer 429). One worker
thread takes a request, waits a short window for more, and generates together the requests of the
same model and the same sampling settings, up to ``max_batch`` prompts; the rest wait for the next
turn. Streaming requests receive their tokens as the decoding loop produces them
(:func:`fewtune.generate.generate_ids`' ``on_step``), as text that can no longer be cut by a stop
string.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


from fewtune.config import GenerateSection
from fewtune.generate import Completion, Loaded, generate_ids, load_for_inference, looks_like_run_dir

log = logging.getLogger(__name__)


class ServeError(ValueError):
    """A model list the server cannot serve (duplicate names, an unreadable run)."""


@dataclass
class Served:
    """One model id of the API: what it loads as, and its adapter on a shared base (None: its own weights)."""

    name: str
    loaded: Loaded
    adapter: str | None = None
    source: str = ""
    created: int = field(default_factory=lambda: int(time.time()))


def parse_targets(targets: list[str]) -> list[tuple[str, str]]:
    """'NAME=PATH' or 'PATH' (named after the folder or model) -> (name, path), names unique."""
    out: list[tuple[str, str]] = []
    for target in targets:
        name, sep, path = target.partition("=")
        if not sep or not name or "/" in name:
            path, name = target, Path(target.rstrip("/")).name or target
        out.append((name, path))
    names = [n for n, _ in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ServeError(f"two models would be called {', '.join(dupes)}: name them, e.g. a=runs/x b=runs/y")
    return out


def _base_of(path: str) -> str | None:
    """The base model a LoRA-style run was trained from (None: not an adapter run)."""
    if not looks_like_run_dir(path) or not (Path(path) / "adapter").is_dir():
        return None
    from fewtune.generate import check_run_dir

    cfg, _ = check_run_dir(Path(path))
    return f"{cfg.model.name}|{cfg.model.dtype}"


def load_models(targets: list[str], precision: str = "auto") -> dict[str, Served]:
    """Load every target; adapter runs on one base model share it (see the module notes)."""
    from fewtune.generate import check_run_dir

    pairs = parse_targets(targets)
    groups: dict[str, list[tuple[str, str]]] = {}
    for name, path in pairs:
        groups.setdefault(_base_of(path) or f"own|{name}", []).append((name, path))
    served: dict[str, Served] = {}
    for key, members in groups.items():
        if len(members) == 1 or key.startswith("own|"):
            for name, path in members:
                log.info("loading %s from %s", name, path)
                served[name] = Served(name, load_for_inference(path, merge=True, precision=precision), None, path)
            continue
        first_name, first_path = members[0]
        log.info("loading %s from %s (base shared by %d runs)", first_name, first_path, len(members))
        loaded = load_for_inference(first_path, merge=False, precision=precision)
        model = loaded.model
        dtype = next(p.dtype for p in model.parameters())
        served[first_name] = Served(first_name, loaded, "default", first_path)
        for name, path in members[1:]:
            log.info("adding %s's adapter from %s", name, path)
            model.load_adapter(str(Path(path) / "adapter"), adapter_name=name)
            for pname, p in model.named_parameters():
                if f".{name}." in pname and p.dtype != dtype:
                    p.data = p.data.to(dtype)  # the base runs in bf16: the new adapter too
            cfg, template = check_run_dir(Path(path))
            served[name] = Served(name, replace(loaded, template=template, config=cfg, source=path), name, path)
        model.eval()
    return served


class QueueFull(RuntimeError):
    """More requests waiting than the server holds."""


@dataclass
class Job:
    """One API request: its prompts (token ids), settings and where its results go."""

    served: Served
    prompts: list[list[int]]
    gen: GenerateSection
    seed: int | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    events: asyncio.Queue | None = None  # streaming: ("delta", prompt, seq, text) items, then the result
    stops: list[str] = field(default_factory=list)

    def key(self) -> tuple:
        g = self.gen
        return (self.served.name, g.temperature, g.top_k, g.top_p, g.max_new_tokens, g.repetition_penalty,
                tuple(g.stop), g.num_return_sequences, self.seed)


class StreamText:
    """Turns one output's tokens into text deltas that a stop string can no longer cut."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.tokens: list[int] = []
        self.upto = 0  # characters of the decoded text dealt with
        self.sent = ""  # what the client has received
        self.stopped = False

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        if cut >= 0:
            self.stopped = True
            safe = cut
        else:
            safe = len(text) - self.hold
            while safe > self.upto and text[safe - 1] == "\ufffd":  # half of a multi-byte character
                safe -= 1
        if safe <= self.upto:
            return ""
        delta, self.upto = text[self.upto:safe], safe
        if not self.sent:
            delta = delta.lstrip()  # as generate() strips the output
        self.sent += delta
        return delta

    def rest(self, final: str) -> str:
        """What the final (cut, stripped) text has beyond what was sent."""
        return final[len(self.sent):] if final.startswith(self.sent) else ""


class Batcher:
    """The worker thread: batches queued jobs of one model and settings, generates, hands back results."""

    def __init__(self, max_queue: int = 64, window_s: float = 0.02, max_batch: int = 16):
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.window_s, self.max_batch = window_s, max_batch
        self.pending: list[Job] = []
        self.busy = 0  # jobs being generated now
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fewtune-serve-batcher", daemon=True)
        self.lock = threading.Lock()  # one generation at a time (the adapters of a shared base switch per batch)
        self.batches: list[int] = []  # jobs per batch run, for tests and /health

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then end the thread."""
        self._stop.set()
        self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.queue.maxsize} requests are already waiting; try again shortly") from None

    def waiting(self) -> int:
        return self.queue.qsize() + len(self.pending) + self.busy

    def _collect(self) -> None:
        if not self.pending:
            try:
                self.pending.append(self.queue.get(timeout=0.1))
            except queue.Empty:
                return
            deadline = time.monotonic() + self.window_s
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    self.pending.append(self.queue.get(timeout=left))
                except queue.Empty:
                    break
        while True:  # whatever else arrived meanwhile
            try:
                self.pending.append(self.queue.get_nowait())
            except queue.Empty:
                break

    def _run(self) -> None:
        while not (self._stop.is_set() and self.queue.empty() and not self.pending):
            self._collect()
            if not self.pending:
                continue
            key = self.pending[0].key()
            group, rest, prompts = [], [], 0
            for job in self.pending:
                if job.key() == key and (not group or prompts + len(job.prompts) <= self.max_batch):
                    group.append(job)
                    prompts += len(job.prompts)
                else:
                    rest.append(job)
            self.pending = rest
            self.busy = len(group)
            try:
                self._generate(group)
            finally:
                self.busy = 0

    def _generate(self, group: list[Job]) -> None:
        first = group[0]
        served, gen = first.served, first.gen
        prompts = [p for job in group for p in job.prompts]
        owner = [(j, i) for j, job in enumerate(group) for i in range(len(job.prompts))]
        first_row = [sum(len(job.prompts) for job in group[:j]) for j in range(len(group))]  # each job's first prompt
        tokenizer = served.loaded.tokenizer
        streams: dict[tuple[int, int], StreamText] = {}
        streaming = any(job.events is not None for job in group)

        def on_step(rows: list[tuple[int, int]], tokens: list[int]) -> None:
            for (prompt, seq), token in zip(rows, tokens):
                j, i = owner[prompt]
                job = group[j]
                if job.events is None:
                    continue
                stream = streams.setdefault((prompt, seq), StreamText(tokenizer, job.stops))
                delta = stream.add(token)
                if delta:
                    job.loop.call_soon_threadsafe(job.events.put_nowait, ("delta", i, seq, delta))

        seed = first.seed if first.seed is not None else random.randrange(2 ** 31)
        try:
            with self.lock:
                if served.adapter is not None:
                    served.loaded.model.set_adapter(served.adapter)
                results = generate_ids(served.loaded, prompts, gen.model_copy(update={"seed": seed,
                                                                                       "batch_size": len(prompts)}),
                                       on_step=on_step if streaming else None)
        except Exception as err:  # noqa: BLE001  the requests get the error; the server goes on
            log.exception("generation failed")
            for job in group:
                job.loop.call_soon_threadsafe(_fail, job, err)
            return
        self.batches.append(len(group))
        for j, job in enumerate(group):
            mine = results[first_row[j]:first_row[j] + len(job.prompts)]
            if job.events is not None:
                for i, outs in enumerate(mine):
                    for seq, out in enumerate(outs):
                        stream = streams.get((first_row[j] + i, seq))
                        rest = stream.rest(out.text) if stream else out.text
                        if rest:
                            job.loop.call_soon_threadsafe(job.events.put_nowait, ("delta", i, seq, rest))
            job.loop.call_soon_threadsafe(_finish, job, mine)


def _finish(job: Job, results: list[list[Completion]]) -> None:
    if job.events is not None:
        job.events.put_nowait(("done", results))
    if not job.future.done():
        job.future.set_result(results)


def _fail(job: Job, err: Exception) -> None:
    if job.events is not None:
        job.events.put_nowait(("error", err))
    if not job.future.done():
        job.future.set_exception(err)


def prompt_limit_error(served: Served, ids: list[int], max_new_tokens: int) -> str | None:
    """The message for a prompt that does not fit the context with max_tokens (None: it fits)."""
    from fewtune.generate import context_limit

    limit = context_limit(served.loaded)
    if limit is not None and len(ids) + max_new_tokens > limit:
        return (f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + max_new_tokens} tokens ({len(ids)} in the messages, {max_new_tokens} in the completion). "
                "Please reduce the length of the messages or the completion.")
    return None


def describe(served: dict[str, Served]) -> list[dict[str, Any]]:
    return [{"id": s.name, "object": "model", "created": s.created, "owned_by": "fewtune",
             "source": s.source, "adapter": s.adapter, "precision": s.loaded.precision} for s in served.values()]
