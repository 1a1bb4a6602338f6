"""Replay against forgetting (``data.replay``): general examples mixed into the training split with
`fewtune data mix`'s function, before rendering.

The mix is written into the run directory (replay_mix.jsonl, every row with its
provenance), and only its general rows join the training examples: the validation split
stays pure domain data, so early stopping watches the task.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fewtune.config import DataSection
from fewtune.data.formats import Example, load_examples, read_records
from fewtune.data.tools import mix_files

log = logging.getLogger(__name__)


def add_replay(train_examples: list[Example], data: DataSection, run_dir: Path) -> list[Example]:
    """The training examples plus ``data.replay.ratio`` general examples per training example (none without
    ``data.replay.general``)."""
    replay = data.replay
    if not replay.general:
        return train_examples
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "replay_mix.jsonl"
    wanted = round(replay.ratio * len(train_examples))
    counts = mix_files(data.train, replay.general, out, count=wanted, seed=data.seed)
    general_lines = {line for line, row in read_records(out) if row.get("provenance", {}).get("set") == "general"}
    general = [e for e in load_examples(out) if e.line in general_lines]
    log.info("replay: %d general examples from %s mixed into %d training examples (ratio %g)",
             len(general), replay.general, len(train_examples), replay.ratio)
    if len(general) != counts["general"]:
        raise RuntimeError(f"replay: {out} holds {len(general)} general rows, data mix wrote {counts['general']}")
    return train_examples + general
