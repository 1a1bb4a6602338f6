"""Where the shared public data sets are found, and the error when they are not.

The data lives outside the project (``../shared/data`` beside the repository, see its
README); it is never copied in. A data set is looked for, in this order:

1. an explicit path (a benchmark's ``--snips DIR``, say): only there;
2. ``$FEWTUNE_SHARED_DATA/<name>`` when that variable is set: only there;
3. ``../shared/data/<name>`` beside the repository this package was installed from
   (editable install), then beside the working directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

ENV_VAR = "FEWTUNE_SHARED_DATA"
# src/fewtune/datasets/common.py -> the repository root (for an editable install)
REPO = Path(__file__).resolve().parents[3]


class DatasetNotFound(FileNotFoundError):
    """A shared data set is not where it was looked for; the message names every place tried."""


def shared_data_candidates() -> list[Path]:
    """The folders that may hold the shared data sets, in the order they are tried."""
    env = os.environ.get(ENV_VAR)
    if env:
        return [Path(env)]
    candidates: list[Path] = []
    for base in (REPO, Path.cwd()):
        path = base.parent / "shared" / "data"
        if path.resolve() not in {c.resolve() for c in candidates}:
            candidates.append(path)
    return candidates


def find_dataset(name: str, explicit: str | Path | None = None,
                 looks_right: Callable[[Path], bool] = Path.is_dir, hint: str = "") -> Path:
    """The folder of the shared data set ``name`` (e.g. ``snips``, ``fewclue/eprstmt``).

    ``looks_right`` tells a real copy from an unrelated folder of that name (default: it is a
    directory). Raises DatasetNotFound listing where it looked and how to point at the data.
    """
    candidates = [Path(explicit)] if explicit else [base / name for base in shared_data_candidates()]
    for path in candidates:
        if looks_right(path):
            return path
    how = hint or "pass its folder explicitly"
    where = "" if explicit else f", or set {ENV_VAR} to the folder that holds {name}/"
    raise DatasetNotFound(f"{name} data not found (looked in {', '.join(map(str, candidates))}); {how}{where}")


def find_shared_data(explicit: str | Path | None = None) -> Path:
    """The shared data folder itself (the one holding snips/, fewclue/, ...)."""
    candidates = [Path(explicit)] if explicit else shared_data_candidates()
    for path in candidates:
        if path.is_dir():
            return path
    raise DatasetNotFound(f"the shared data folder is missing (looked in {', '.join(map(str, candidates))})"
                          + ("" if explicit else f"; set {ENV_VAR} or pass its path"))
