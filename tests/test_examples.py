"""The example configs load against the schema, and examples/demo.yaml is the recipe `make demo` runs."""

from pathlib import Path

import pytest

from fewtune.config import load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads(path):
    cfg = load_config(path)
    assert cfg.data.train is None or Path(cfg.data.train).is_file()  # relative paths resolve from the file


def test_demo_yaml_is_the_demo_recipe():
    from fewtune.demo.run import demo_config

    from_yaml = load_config(EXAMPLES / "demo.yaml").model_dump(mode="json")
    from_demo = demo_config("runs/demo").model_dump(mode="json")
    for cfg in (from_yaml, from_demo):
        cfg["train"].pop("output_dir")
        cfg["data"]["train"] = str(Path(cfg["data"]["train"]).resolve())
    assert from_yaml == from_demo
