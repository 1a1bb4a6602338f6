"""What a run directory says about the fewtune that wrote it: ``RUN_DIR/fewtune.json``.

``run_format`` is the layout version of the run directory (files, their meaning). A reader
accepts runs of its own format or older; a run written by a newer fewtune, or whose marker
is unreadable, is refused with one line saying what to do. Runs from before the marker
existed have no file and are read as format 1.
"""

from __future__ import annotations

import json
from pathlib import Path

RUN_FORMAT = 1
MARKER = "fewtune.json"


class RunFormatError(ValueError):
    """A run directory this fewtune cannot read (newer format, damaged marker)."""


def write_marker(run_dir: Path) -> None:
    from fewtune.files import atomic_write_text

    try:
        from importlib.metadata import version

        fewtune_version = version("fewtune")
    except Exception:  # running from a source tree that is not installed
        fewtune_version = "unknown"
    atomic_write_text(Path(run_dir) / MARKER, json.dumps({"run_format": RUN_FORMAT,
                                                          "fewtune_version": fewtune_version}, indent=2))


def check_run_format(run_dir: Path) -> int:
    """The run's format; raises RunFormatError when this fewtune cannot read it."""
    path = Path(run_dir) / MARKER
    if not path.exists():
        return 1
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        found = int(info["run_format"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RunFormatError(f"{path} is damaged ({err}); the run directory cannot be trusted") from None
    if found > RUN_FORMAT:
        raise RunFormatError(f"{run_dir} was written by fewtune {info.get('fewtune_version', '?')} (run format "
                             f"{found}); this fewtune reads run format {RUN_FORMAT} and older: upgrade fewtune")
    return found
