"""`fewtune data split / convert / mix`: reshaping a data set that `data check` passes.

All three read with the checking reader and refuse a file with errors (naming the first
ones and pointing at `data check` / `data clean`), so nothing is silently dropped; all
randomness is seeded.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

from fewtune.data.collect import Collected
from fewtune.data.dataset import split_examples
from fewtune.data.formats import DataError, Example, get_writer, to_record

log = logging.getLogger(__name__)


def load_checked(path: str | Path, fmt: str = "auto", dataset: str | None = None,
                 rename: dict[str, str] | None = None, encoding: str | None = None) -> Collected:
    """Read a data file with every check of the reader; any error stops here, with where to look.

    ``encoding``: utf-8 (the default), auto (detect) or a codec name such as gb18030.
    """
    from fewtune.quality.check import collect_data

    data = collect_data(path, fmt, dataset, rename, encoding=encoding)
    errors = [p for p in data.problems if p.severity == "error"]
    if errors:
        listing = "\n".join(f"  {p}" for p in errors[:5])
        more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise DataError(data.path, errors[0].line, f"{len(errors)} problem(s) in the input:\n{listing}{more}\n"
                        "Run `fewtune data check` to see them all, or `fewtune data clean` to set bad records aside.")
    if not data.examples:
        raise DataError(data.path, None, "no examples")
    return data


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- split


def split_file(path: str | Path, out_dir: str | Path, val_ratio: float = 0.1, test_ratio: float = 0.0,
               seed: int = 42, kfold: int | None = None, fmt: str = "auto", dataset: str | None = None,
               rename: dict[str, str] | None = None, encoding: str | None = None) -> dict[str, int]:
    """Write train/validation(/test) files, or ``kfold`` folds, of the records as they are in the input.

    Classification data (every example labelled) is split per label, so each part keeps the
    class proportions; the same seed gives the same split.
    """
    if not 0 <= val_ratio < 1 or not 0 <= test_ratio < 1 or val_ratio + test_ratio >= 1:
        raise ValueError(f"--val {val_ratio} and --test {test_ratio} must be in [0, 1) and sum to less than 1")
    data = load_checked(path, fmt, dataset, rename, encoding)
    out = Path(out_dir)
    records = data.records
    if kfold:
        folds = kfold_examples(data.examples, kfold, seed)
        sizes = {}
        for i, fold in enumerate(folds, start=1):
            held = {e.line for e in fold}
            write_jsonl(out / f"fold_{i}" / "train.jsonl", [records[e.line] for e in data.examples if e.line not in held])
            write_jsonl(out / f"fold_{i}" / "validation.jsonl", [records[e.line] for e in fold])
            sizes[f"fold_{i}"] = len(fold)
        return sizes
    rest, test = split_examples(data.examples, test_ratio, seed) if test_ratio else (data.examples, [])
    train, val = split_examples(rest, val_ratio / (1 - test_ratio), seed + 1) if val_ratio else (rest, [])
    parts = {"train": train, "validation": val, **({"test": test} if test_ratio else {})}
    for name, part in parts.items():
        write_jsonl(out / f"{name}.jsonl", [records[e.line] for e in sorted(part, key=lambda e: e.line)])
    return {name: len(part) for name, part in parts.items()}


def kfold_examples(examples: list[Example], k: int, seed: int) -> list[list[Example]]:
    """K disjoint folds covering the examples, shuffled with ``seed`` (scikit-learn).

    ``StratifiedKFold`` when every example is labelled and every label has at least K
    examples, so each fold keeps the class proportions; ``KFold`` otherwise. The one fold
    split of fewtune: `fewtune data split --kfold` and `fewtune sweep --kfold` give the
    same folds for the same examples and seed. Each fold lists its examples in file order.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    if k < 2 or k > len(examples):
        raise ValueError(f"--kfold needs 2 <= K <= the number of examples ({len(examples)}), got {k}")
    labels = [e.label for e in examples]
    counts = Counter(labels)
    index = list(range(len(examples)))
    if None not in counts and min(counts.values()) >= k:
        splits = StratifiedKFold(k, shuffle=True, random_state=seed).split(index, labels)
    else:
        if None not in counts:
            small = sorted((n, str(label)) for label, n in counts.items() if n < k)
            log.warning("--kfold %d: the folds are not stratified by label, as %d label(s) have fewer than %d "
                        "examples (%s)", k, len(small), k, ", ".join(f"{label}: {n}" for n, label in small[:5]))
        splits = KFold(k, shuffle=True, random_state=seed).split(index)
    return [[examples[i] for i in sorted(held_out)] for _, held_out in splits]


# ---------------------------------------------------------------- convert


def convert_examples(examples: list[Example], fmt: str) -> list[dict]:
    rows, unfit = [], []
    for example in examples:
        try:
            rows.append(to_record(example, fmt))
        except DataError as err:
            unfit.append(err)
    if unfit:
        listing = "\n".join(f"  {e}" for e in unfit[:5])
        raise DataError(unfit[0].file, unfit[0].line, f"{len(unfit)} of {len(examples)} examples do not fit {fmt}:\n"
                        f"{listing}" + (f"\n  ... and {len(unfit) - 5} more" if len(unfit) > 5 else ""))
    return rows


def convert_file(path: str | Path, out: str | Path, to: str, fmt: str = "auto", dataset: str | None = None,
                 rename: dict[str, str] | None = None, encoding: str | None = None) -> int:
    """Convert a data file to another format (JSON lines); returns the number of examples written."""
    get_writer(to)  # an unknown --to stops before the input is read
    data = load_checked(path, fmt, dataset, rename, encoding)
    write_jsonl(out, convert_examples(data.examples, to))
    return len(data.examples)


# ---------------------------------------------------------------- mix


def mix_files(domain: str | Path, general: str | Path, out: str | Path, ratio: float | None = None,
              count: int | None = None, seed: int = 42, rename: dict[str, str] | None = None,
              encoding: str | None = None) -> dict[str, int]:
    """All domain examples plus a seeded sample of general ones, shuffled, as chat messages.

    ``ratio`` general examples per domain example (7 means 7:1, a common guard against
    forgetting), or a fixed ``count`` of general examples. Each row carries
    ``provenance: {set, file, line}`` so any example can be traced back.
    """
    if (ratio is None) == (count is None):
        raise ValueError("give exactly one of --ratio (general examples per domain example) or --count")
    dom = load_checked(domain, rename=rename, encoding=encoding)
    gen = load_checked(general, encoding=encoding)
    wanted = round(ratio * len(dom.examples)) if ratio is not None else count
    if wanted is None or wanted < 0:
        raise ValueError(f"the number of general examples must be >= 0, got {wanted}")
    if wanted > len(gen.examples):
        raise DataError(gen.path, None, f"{wanted} general examples wanted ({f'ratio {ratio:g} x {len(dom.examples)} domain' if ratio is not None else 'count'}) "
                        f"but the file has {len(gen.examples)}; lower --ratio/--count or add general data")
    rng = random.Random(seed)
    picked = rng.sample(gen.examples, wanted)
    rows = []
    for name, data, examples in (("domain", dom, dom.examples), ("general", gen, picked)):
        for e in examples:
            rows.append({**e.to_dict(), "provenance": {"set": name, "file": data.path, "line": e.line}})
    rng.shuffle(rows)
    write_jsonl(out, rows)
    return {"domain": len(dom.examples), "general": len(picked), "total": len(rows)}

