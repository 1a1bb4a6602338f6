"""The example configs load against the schema, and examples/demo.yaml is the recipe `make demo` runs."""

from pathlib import Path

import copy

import pytest
import yaml

from fewtune.config import MOVED_KEYS, load_config, move_keys, moved_key, schema_paths

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads(path):
    cfg = load_config(path)
    assert cfg.data.train is None or Path(cfg.data.train).is_file()  # relative paths resolve from the file


def _key_paths(data: dict, sections: set[tuple[str, ...]], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path an example writes, descending into a mapping only where the schema has a section."""
    out = []
    for key, value in data.items():
        path = (*prefix, str(key))
        out.append(path)
        if isinstance(value, dict) and path in sections:
            out += _key_paths(value, sections, path)
    return out


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_key_of_an_example_is_a_schema_key(path):
    """No example leans on a key the schema only accepts to migrate it (a moved key) or on anything else off it."""
    paths = schema_paths()
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    written = _key_paths(data, {p[:-1] for p in paths})
    assert len(written) > 3  # the file was really read
    assert [".".join(p) for p in written if p not in set(paths)] == []
    assert [".".join(p) for p in written if moved_key(".".join(p))] == []
    assert move_keys(copy.deepcopy(data), str(path)) == data  # loading it migrates nothing


def test_the_key_walk_flags_a_key_off_the_schema():
    sections = {p[:-1] for p in schema_paths()}
    written = _key_paths({"model": {"name": "m"}, "method": {"lora": {"r": 4, "rank": 4}, "lorra": {"r": 4}}}, sections)
    assert [p for p in written if p not in set(schema_paths())] == [("method", "lora", "rank"), ("method", "lorra")]


def test_a_moved_key_is_off_the_schema():
    """So the schema-path check above also fails an example that still writes a key at its old place."""
    paths = {".".join(p) for p in schema_paths()}
    assert MOVED_KEYS and [old for old in MOVED_KEYS if old in paths] == []
    assert all(new in paths for new in MOVED_KEYS.values())


def test_demo_yaml_is_the_demo_recipe():
    from fewtune.demo.run import demo_config

    from_yaml = load_config(EXAMPLES / "demo.yaml").model_dump(mode="json")
    from_demo = demo_config("runs/demo").model_dump(mode="json")
    for cfg in (from_yaml, from_demo):
        cfg["train"].pop("output_dir")
        cfg["data"]["train"] = str(Path(cfg["data"]["train"]).resolve())
    assert from_yaml == from_demo
