"""How every `fewtune` command (and `fewtune data ...`) answers bad input: one line on stderr, exit code 2."""

from __future__ import annotations

import typer


def one_line(err: BaseException) -> str:
    """What went wrong in one line, whatever raised it (OS errors as 'PATH: what', several lines joined)."""
    import json as _json

    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror[:1].lower()}{err.strerror[1:]}"
    elif isinstance(err, _json.JSONDecodeError):
        text = f"not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
    elif isinstance(err, UnicodeDecodeError):
        text = f"not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})"
    else:
        text = str(err) or type(err).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    out = lines[0] if lines else type(err).__name__
    for line in lines[1:]:
        out += (" " if out.endswith(":") else "; ") + line
    return out


def fail(err: BaseException, code: int = 2) -> None:
    typer.secho(f"error: {one_line(err)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors bad input causes (a file missing, damaged or of the wrong kind, a bad value): one line, exit 2."""
    import json as _json

    import yaml

    from fewtune.augment.base import AugmentError
    from fewtune.average import AverageError
    from fewtune.config import ConfigError
    from fewtune.data.formats import DataError
    from fewtune.data.images import ImageError
    from fewtune.data.render import RenderError
    from fewtune.eval.evaluate import EvalError
    from fewtune.eval.shots import ShotsError
    from fewtune.gguf_export import GGUFExportError
    from fewtune.generate import PromptError, RunDirError
    from fewtune.models import ModelNotFoundError
    from fewtune.runinfo import RunFormatError
    from fewtune.methods import MethodError
    from fewtune.train.loop import TrainingError
    from fewtune.vision import VisionError

    return (AugmentError, AverageError, ConfigError, DataError, RenderError, ModelNotFoundError, TrainingError, EvalError, ShotsError, GGUFExportError, RunFormatError,
            RunDirError, PromptError, MethodError, ImageError, VisionError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
            PermissionError, FileExistsError, UnicodeDecodeError, yaml.YAMLError, _json.JSONDecodeError)


def run_stage(fn, *args, broad: bool = False, **kwargs):
    """Call a stage function, turning the errors users cause into one clear line and exit code 2 (``broad``: any
    OSError or ValueError too, for the data commands, whose stage functions raise those for bad input)."""
    from fewtune.train.loop import Interrupted

    try:
        return fn(*args, **kwargs)
    except Interrupted as err:
        typer.secho(str(err), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(err.exit_code)  # 130 after Ctrl-C, 143 after SIGTERM
    except user_errors() + ((OSError, ValueError) if broad else ()) as err:
        fail(err)
