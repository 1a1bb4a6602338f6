"""`fewtune augment`: grow a small data set without changing an answer or leaking test data.

For each method, each example gets up to ``per_example`` candidates from the method (its random
generator seeded by the seed, the method and the example's position, so a run is repeatable and
adding a method does not change another's output). A candidate is kept only if

- its input changed (near-duplicate normaliser of `data check`: case, width, spaces, punctuation),
- it is not a near-duplicate of an original input or of another kept augmentation,
- it is not a near-duplicate of a validation/test input (``exclude``: leakage),
- every protected span of the source (the label, every string a JSON target quotes) is still in it,
- it is in the language of its source (no Chinese in an English input, none of a Chinese input's
  Chinese lost: a small LLM's paraphrase or round trip can answer in the other language),
- its user turns are not far longer or shorter than the source's (``max_length_ratio``: a small
  LLM that rambles on, or stops after two words, drifts away from the real data whatever the label),
- for examples without a label (generation, extraction), it is similar enough to its source
  (``min_similarity``: a paraphrase that drifted off is dropped),
- with ``consistency`` (a run or model), its label as that model predicts it by choice scoring is
  not confidently another one.

The output holds every original record unchanged and in order, each followed by its kept
augmentations, which carry their provenance (``augment: {method, source: {file, line}, params}``);
``only_new`` writes the augmentations alone (for `fewtune data mix`). Rejected candidates go to
``<out>.rejects.jsonl`` with the reason, and ``<out>.summary.json`` counts per method what was
generated, kept and rejected by reason.
"""

from __future__ import annotations

import difflib
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fewtune.augment.base import AugmentError, Candidate, Resources
from fewtune.augment.methods import get_method
from fewtune.augment.spans import input_text, protected_spans, spans_kept
from fewtune.data.formats import Example, to_record
from fewtune.quality.duplicates import input_key
from fewtune.quality.textstats import language, normalize

log = logging.getLogger(__name__)

REASONS = ("empty", "unchanged", "duplicate of an original", "duplicate of another augmentation",
           "leaks into an excluded file", "protected span lost", "another language than its source",
           "length far from its source", "too different from its source", "label changed")
LENGTH_SLACK = 5  # characters added to both lengths, so that a short input may gain or lose a word


@dataclass
class AugmentSettings:
    methods: list[str]
    per_example: int = 1  # candidates asked of each method for each example
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method
    seed: int = 42
    model: str | None = None  # the LLM for backtranslate / paraphrase / dialogue: a run, a model folder, a .gguf
    exclude: list[str] = field(default_factory=list)  # validation / test files: no augmentation may match their inputs
    min_similarity: float = 0.3  # examples without a label: floor of the source/augmentation similarity (0: off)
    max_length_ratio: float = 2.0  # reject a candidate whose user text is this many times longer/shorter (0: off)
    consistency: str | None = None  # a run or model judging that labels did not change (classification)
    consistency_threshold: float = 0.8  # reject when another label is predicted with at least this probability
    only_new: bool = False  # write the augmentations only, not the originals
    protect: list[str] = field(default_factory=list)  # further strings never changed (e.g. entity names)


@dataclass
class MethodCount:
    generated: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {"generated": self.generated, "kept": self.kept, "rejected": dict(self.rejected)}


@dataclass
class AugmentResult:
    out: Path
    rejects: Path
    summary_path: Path
    originals: int
    counts: dict[str, MethodCount]
    kept: list[tuple[int, str, Candidate]]  # (index of the source example, method, candidate)

    @property
    def total_kept(self) -> int:
        return sum(c.kept for c in self.counts.values())

    def summary(self) -> dict:
        return {"originals": self.originals, "kept": self.total_kept, "out": str(self.out),
                "rejects": str(self.rejects), "methods": {m: c.to_dict() for m, c in self.counts.items()}}


def similarity(a: str, b: str) -> float:
    """How much of two texts is the same, 0..1, on the normalised characters (works for Chinese and English)."""
    return difflib.SequenceMatcher(None, normalize(a), normalize(b), autojunk=False).ratio()


def length_ratio(source: Example, cand: Example) -> float:
    """How many times longer (> 1) or shorter (< 1) the candidate's user turns are than the source's, on the
    normalised characters. Turns a dialogue extension adds after the source's last user turn do not count."""
    src = [len(normalize(m.content)) for m in source.prompt_messages if m.role == "user"]
    new = [len(normalize(m.content)) for m in cand.prompt_messages if m.role == "user"][:len(src)]
    return (sum(new) + LENGTH_SLACK) / (sum(src) + LENGTH_SLACK)


def language_changed(source_text: str, text: str) -> bool:
    """An English input that gained Chinese (or other CJK) text, or a Chinese one that lost all of it."""
    return (language(source_text) == "en") != (language(text) == "en")


def _excluded_keys(files: list[str]) -> dict[tuple, str]:
    """Input key -> the file it comes from, for every readable example of the excluded files."""
    from fewtune.data.collect import collect

    keys: dict[tuple, str] = {}
    for file in files:
        data = collect(file)
        if not data.examples:
            raise AugmentError(f"--exclude {file}: no example could be read from it"
                               + (f" ({data.problems[0]})" if data.problems else ""))
        for example in data.examples:
            keys.setdefault(input_key(example), file)
    return keys


def _key(example: Example) -> tuple:
    """What makes two examples the same input: the normalised text and the images it shows (an image
    augmentation changes only the latter)."""
    return input_key(example), tuple(example.images)


def _reject_reason(source: Example, cand: Example, spans: list[str], originals: set, kept: set,
                   excluded: dict[tuple, str], settings: AugmentSettings) -> str | None:
    text = input_text(cand)
    if not normalize(text):
        return "empty"
    key = _key(cand)
    if key == _key(source):
        return "unchanged"
    if key in originals:
        return "duplicate of an original"
    if key in kept:
        return "duplicate of another augmentation"
    if input_key(cand) != input_key(source) and input_key(cand) in excluded:
        return "leaks into an excluded file"
    if spans_kept(cand, spans):
        return "protected span lost"
    if language_changed(input_text(source), text):
        return "another language than its source"
    ratio = settings.max_length_ratio
    if ratio > 0 and not 1 / ratio <= length_ratio(source, cand) <= ratio:
        return "length far from its source"
    min_similarity = settings.min_similarity
    if source.label is None and min_similarity > 0 and similarity(input_text(source), text) < min_similarity:
        return "too different from its source"
    return None


def _provenance(method: str, example: Example, cand: Candidate, seed: int) -> dict:
    return {"method": method, "source": {"file": example.source, "line": example.line}, "seed": seed,
            "params": cand.params}


def _record(example: Example, fmt: str, provenance: dict) -> dict:
    return {**to_record(example, fmt), "augment": provenance}


def augment_examples(examples: list[Example], settings: AugmentSettings,
                     progress: bool = True) -> tuple[list[tuple[int, str, Candidate]], list[dict], dict[str, MethodCount]]:
    """Candidates of every method for every example, filtered; returns (kept, rejected, counts per method).

    ``kept``: (source index, method, candidate) in source order, then method order; ``rejected``:
    dicts with the source index, the method, the candidate and the reason.
    """
    from tqdm.auto import tqdm

    if not settings.methods:
        raise AugmentError("no augmentation method given; known: " + ", ".join(_known()))
    if settings.per_example < 1:
        raise AugmentError(f"per_example must be at least 1, got {settings.per_example}")
    excluded = _excluded_keys(settings.exclude)
    originals = {_key(e) for e in examples}
    leaking = sum(1 for e in examples if input_key(e) in excluded)
    if leaking:
        log.warning("%d of the %d input examples are themselves in an excluded file (leakage before augmenting): "
                    "`fewtune data check FILE --val ...` lists them", leaking, len(examples))
    resources = Resources(model=settings.model)
    kept_keys: set = set()
    kept: list[tuple[int, str, Candidate]] = []
    rejected: list[dict] = []
    counts: dict[str, MethodCount] = {}
    for name in settings.methods:
        method = get_method(name)
        augmenter = method.make(settings.options.get(name), resources)
        count = counts[name] = MethodCount()
        for index, example in enumerate(tqdm(examples, desc=f"augment: {name}", unit="example",
                                             disable=not progress, leave=False)):
            rng = random.Random(f"{settings.seed}:{name}:{index}")
            spans = protected_spans(example, settings.protect)
            for cand in augmenter(example, settings.per_example, rng, list(spans))[:settings.per_example]:
                count.generated += 1
                reason = _reject_reason(example, cand.example, spans, originals, kept_keys, excluded, settings)
                if reason is None:
                    kept_keys.add(_key(cand.example))
                    kept.append((index, name, cand))
                else:
                    rejected.append({"index": index, "method": name, "candidate": cand, "reason": reason})
    if settings.consistency:
        kept = _label_filter(examples, kept, rejected, settings)
    for _, name, _ in kept:
        counts[name].kept += 1
    for rej in rejected:
        counts[rej["method"]].rejected[rej["reason"]] += 1
    kept.sort(key=lambda item: (item[0], settings.methods.index(item[1])))
    return kept, rejected, counts


def _label_filter(examples: list[Example], kept: list, rejected: list, settings: AugmentSettings) -> list:
    from fewtune.augment.consistency import LabelConsistency

    labelled = [item for item in kept if examples[item[0]].label is not None]
    if not labelled:
        log.warning("consistency: no labelled example (classification data) to check; nothing filtered")
        return kept
    labels = sorted({e.label for e in examples if e.label is not None})
    judge = LabelConsistency(settings.consistency, labels, threshold=settings.consistency_threshold)
    reasons = judge.check([examples[i] for i, _, _ in labelled], [c.example for _, _, c in labelled])
    dropped = set()
    for item, reason in zip(labelled, reasons):
        if reason:
            dropped.add(id(item))
            rejected.append({"index": item[0], "method": item[1], "candidate": item[2], "reason": "label changed",
                             "detail": reason})
    return [item for item in kept if id(item) not in dropped]


def _known() -> list[str]:
    from fewtune.augment.base import AUGMENT_METHODS
    from fewtune.augment import methods  # noqa: F401

    return list(AUGMENT_METHODS)


def augment_file(path: str | Path, out: str | Path, settings: AugmentSettings, fmt: str = "auto",
                 dataset: str | None = None, rename: dict[str, str] | None = None, encoding: str | None = None,
                 progress: bool = True) -> AugmentResult:
    """Augment a data file (any format the reader takes) into JSON lines of the same format; see the module doc."""
    from fewtune.data.tools import load_checked, write_jsonl

    data = load_checked(path, fmt, dataset, rename, encoding)
    fmt_out = data.fmt or "messages"
    if "image" in settings.methods and not settings.options.get("image", {}).get("out_dir"):
        # new images beside the output file (not in a temporary folder the output would point into)
        images = Path(out).with_name(Path(out).name.removesuffix(".jsonl") + ".images")
        settings = replace(settings, options={**settings.options,
                                              "image": {**settings.options.get("image", {}), "out_dir": str(images)}})
    examples = data.examples
    kept, rejected, counts = augment_examples(examples, settings, progress)
    theirs = data.their_names  # --map: the augmentations use the file's own field names, as the originals do

    def record(example: Example, provenance: dict) -> dict:
        return {theirs.get(k, k): v for k, v in _record(example, fmt_out, provenance).items()}

    by_source: dict[int, list[dict]] = {}
    for index, name, cand in kept:
        by_source.setdefault(index, []).append(
            record(cand.example, _provenance(name, examples[index], cand, settings.seed)))
    rows: list[dict] = []
    for index, example in enumerate(examples):
        if not settings.only_new:
            rows.append(data.records.get(example.line) or to_record(example, fmt_out))
        rows.extend(by_source.get(index, []))
    out = write_jsonl(out, rows)
    rejects = out.with_name(out.name.removesuffix(".jsonl") + ".rejects.jsonl")
    write_jsonl(rejects, [{**record(r["candidate"].example,
                                    _provenance(r["method"], examples[r["index"]], r["candidate"], settings.seed)),
                           "reason": r["reason"], **({"detail": r["detail"]} if "detail" in r else {})}
                          for r in rejected])
    result = AugmentResult(out, rejects, out.with_name(out.name.removesuffix(".jsonl") + ".summary.json"),
                           len(examples), counts, kept)
    result.summary_path.write_text(json.dumps(result.summary(), ensure_ascii=False, indent=2) + "\n",
                                   encoding="utf-8")
    return result


def summary_table(result: AugmentResult):
    """A rich table: per method, generated, kept, and rejected by reason."""
    from rich.table import Table

    reasons = [r for r in REASONS if any(c.rejected.get(r) for c in result.counts.values())]
    table = Table(title=f"{result.originals} originals + {result.total_kept} augmentations -> {result.out}")
    for col in ("method", "generated", "kept", *reasons):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, count in result.counts.items():
        table.add_row(name, str(count.generated), str(count.kept), *(str(count.rejected.get(r, 0)) for r in reasons))
    return table
