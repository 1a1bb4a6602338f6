"""The README's config reference is the one the schema writes, and the writer renders what a section says."""

from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from fewtune.config import Section, schema_paths
from fewtune.config_reference import (COMMAND, END, START, between_markers, render_reference,
                                      replace_between_markers, update_readme)

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_reference_is_the_schema_s():
    in_readme = between_markers(README.read_text(encoding="utf-8"))
    assert in_readme == render_reference(), (
        f"README.md's config reference no longer matches src/fewtune/config.py: run `{COMMAND}` and commit README.md")


def _rows(markdown: str) -> dict[str, list[str]]:
    """Table rows by key path: the cells after the key."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_every_leaf_key_of_the_schema_has_one_row():
    paths = schema_paths()
    sections = {p[:-1] for p in paths}
    leaves = [".".join(p) for p in paths if p not in sections]
    rows = _rows(render_reference())
    assert sorted(rows) == sorted(leaves)
    # and every section has its heading, nested ones included
    headings = {line.split("`")[1] for line in render_reference().splitlines() if line.startswith("#")}
    assert headings == {".".join(p) for p in sections if p}


class _Inner(Section):
    """The inner part.

    Its docstring spans lines."""

    depth: int = Field(2, ge=1, le=4)


class _Plain(Section):
    on: bool = False


class _Sample(Section):
    """A section made for this test."""

    mode: Literal["fast", "no", "slow"] = Field("fast", description="how to go | which way")
    ratio: float = Field(0.5, gt=0.0, lt=1.0)
    size: int | None = Field(None, gt=0, description="null: as large as it gets")
    names: list[str] = []
    marker: str = " END"
    kind: Literal["a", "b"] | None = None
    inner: _Inner = Field(_Inner(), description="Settings of the inner part.")
    plain: _Plain = Field(_Plain(), description="A section without a docstring of its own.")


class _Top(Section):
    sample: _Sample = _Sample()


def test_a_hand_made_section_renders_as_expected():
    assert render_reference(_Top) == """\
### `sample`

A section made for this test. Sections in it: `sample.inner`, `sample.plain`.

| key | type | default | constraints | description |
|---|---|---|---|---|
| `sample.mode` | one of `fast`, `"no"`, `slow` | `fast` |  | how to go \\| which way |
| `sample.ratio` | float | `0.5` | > 0.0, < 1.0 |  |
| `sample.size` | int or null | `null` | > 0 | null: as large as it gets |
| `sample.names` | list of str | `[]` |  |  |
| `sample.marker` | str | `" END"` |  |  |
| `sample.kind` | one of `a`, `b`; or null | `null` |  |  |

#### `sample.inner`

The inner part. Its docstring spans lines.

| key | type | default | constraints | description |
|---|---|---|---|---|
| `sample.inner.depth` | int | `2` | >= 1, <= 4 |  |

#### `sample.plain`

A section without a docstring of its own.

| key | type | default | constraints | description |
|---|---|---|---|---|
| `sample.plain.on` | bool | `false` |  |  |
"""


def test_the_rendered_defaults_read_back_as_the_defaults():
    """Every default in the reference, read as YAML, is the schema's default (quoting included: `"no"`, `" END"`)."""
    import yaml

    from fewtune.config import Config

    defaults = Config().model_dump(mode="json")
    for key, cells in _rows(render_reference()).items():
        value = defaults
        for part in key.split("."):
            value = value[part]
        assert yaml.safe_load(cells[1].strip("`").replace("\\|", "|")) == value, key


def test_the_readme_is_rewritten_between_the_markers_only(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(f"# title\n\nprose kept\n\n{START}\nstale table\n{END}\n\n## next\n", encoding="utf-8")
    assert update_readme(path) is True
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# title\n\nprose kept\n\n" + START + "\n\n")
    assert text.endswith("\n\n" + END + "\n\n## next\n")
    assert between_markers(text) == render_reference()
    assert update_readme(path) is False  # a second run changes nothing


def test_a_readme_without_the_markers_is_refused():
    with pytest.raises(ValueError, match="config-reference:start"):
        replace_between_markers("# no markers here\n", "body")
    with pytest.raises(ValueError, match="in that order"):
        between_markers(f"{END}\n{START}\n")
