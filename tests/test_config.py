import logging

import pytest

from fewtune.config import MOVED_KEYS, ConfigError, build_config, load_config, moved_key


def test_defaults_follow_small_data_practice():
    cfg = build_config({})
    assert (cfg.method.name, cfg.method.lora.r, cfg.method.lora.alpha, cfg.method.lora.dropout) == ("lora", 8, 16, 0.05)
    assert cfg.train.resolved_lr("lora") == 1e-4 and cfg.train.resolved_lr("full") == 1e-5
    assert (cfg.train.epochs, cfg.train.weight_decay, cfg.train.max_grad_norm, cfg.train.warmup_ratio) == (3, 0.01, 1.0, 0.03)
    assert cfg.train.scheduler == "cosine" and cfg.eval.early_stopping.enabled
    assert cfg.eval.task is None and cfg.eval.metric == "loss"  # training: validation loss only


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rat'.*|did you mean") as info:
        build_config({"train": {"lrr": 1}})
    assert "did you mean 'train.lr'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        build_config({"method": {"lora": {"rank": 4}}})
    assert "method.lora.rank" in str(info.value) and "method.lora.r" in str(info.value)
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        build_config({"trian": {}})


def test_wrong_type_names_the_key_path():
    with pytest.raises(ConfigError, match=r"'train.batch_size'") as info:
        build_config({"train": {"batch_size": "eight"}})
    assert "eight" in str(info.value)
    with pytest.raises(ConfigError, match=r"'method.name'"):
        build_config({"method": {"name": "lorax"}})


def test_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n")
    cfg = load_config(path, ["train.lr=2e-4", "method.lora.target_modules=[q_proj,v_proj]", "data.system_prompt=你好"])
    assert cfg.train.lr == 2e-4 and cfg.method.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.system_prompt == "你好"
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        load_config(path, ["train.epoch=2"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(path, ["train.lr"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


# ---------------------------------------------------------------- every key: wrong type, out of range, wrong section

import types  # noqa: E402
import typing  # noqa: E402

import annotated_types  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from fewtune.config import Config, schema_paths  # noqa: E402


def _nested(path: tuple[str, ...], value) -> dict:
    data = value
    for part in reversed(path):
        data = {part: data}
    return data


def _leaf_fields():
    """(dotted path, pydantic FieldInfo) for every leaf of the schema."""
    out = []

    def walk(cls: type[BaseModel], prefix: tuple[str, ...]):
        for name, field in cls.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, (*prefix, name))
            else:
                out.append(((*prefix, name), field))

    walk(Config, ())
    return out


def _kinds(annotation) -> set:
    """The value kinds an annotation accepts: int, float, str, bool, list, dict, none, literal."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return {"literal"}
    if origin is list:
        return {"list"}
    if origin is dict:
        return {"dict"}
    return {{int: "int", float: "float", str: "str", bool: "bool", type(None): "none"}[annotation]}


def _wrong_value(annotation):
    """A value of a type the field does not take (as YAML would hand it over)."""
    kinds = _kinds(annotation)
    if kinds & {"int", "float"}:
        return "not-a-number"
    if "bool" in kinds:
        return "maybe"
    if "literal" in kinds:
        return "no-such-choice"
    if "str" in kinds:
        return 12.5  # YAML `key: 12.5`: a number where text is expected
    if kinds & {"list", "dict"}:
        return 7
    raise AssertionError(f"no wrong value for {annotation}")


LEAVES = _leaf_fields()


def test_the_walk_covers_the_schema():
    assert len(LEAVES) > 80 and ("train", "lr") in [p for p, _ in LEAVES]
    assert len({p for p, _ in LEAVES}) == len(LEAVES)


@pytest.mark.parametrize("path,field", LEAVES, ids=[".".join(p) for p, _ in LEAVES])
def test_every_key_given_a_wrong_type_names_its_path(path, field):
    value = _wrong_value(field.annotation)
    with pytest.raises(ConfigError) as info:
        build_config(_nested(path, value))
    message = str(info.value)
    assert f"'{'.'.join(path)}'" in message and repr(value) in message and "\n" not in message


def _out_of_range(field):
    kinds = _kinds(field.annotation)
    step = 1 if "float" not in kinds else 0.5
    for c in field.metadata:
        if isinstance(c, annotated_types.Gt):
            yield c.gt
        elif isinstance(c, annotated_types.Ge):
            yield c.ge - step
        elif isinstance(c, annotated_types.Lt):
            yield c.lt
        elif isinstance(c, annotated_types.Le):
            yield c.le + step


RANGED = [(p, v) for p, f in LEAVES for v in _out_of_range(f)]


def test_the_walk_finds_the_constrained_fields():
    paths = {".".join(p) for p, _ in RANGED}
    assert {"train.lr", "data.val_ratio", "method.lora.r", "generate.top_p", "regularise.label_smoothing"} <= paths
    assert len(RANGED) > 40


@pytest.mark.parametrize("path,value", RANGED, ids=[f"{'.'.join(p)}={v}" for p, v in RANGED])
def test_every_constrained_key_out_of_range_names_its_path(path, value):
    with pytest.raises(ConfigError) as info:
        build_config(_nested(path, value))
    message = str(info.value)
    assert f"'{'.'.join(path)}'" in message and ("greater than" in message or "less than" in message)


def test_a_whole_section_given_a_scalar_names_it():
    for section in {p[:1] for p in schema_paths()} | {("method", "lora"), ("eval", "early_stopping")}:
        with pytest.raises(ConfigError, match=f"'{'.'.join(section)}': Input should be a valid dictionary"):
            build_config(_nested(section, 3))


@pytest.mark.parametrize("given,expected", [
    ({"method": {"r": 4}}, "method.lora.r"),
    ({"train": {"label_smoothing": 0.1}}, "regularise.label_smoothing"),
    ({"lr": 1e-4}, "train.lr"),
    ({"method": {"dropout": 0.1}}, "method.lora.dropout"),
    ({"patience": 2}, "eval.early_stopping.patience"),
    ({"train": {"lora": {"r": 4}}}, "method.lora"),  # a whole section in the wrong place
    ({"data": {"epochs": 1}}, "data.curriculum.epochs"),  # the shared prefix wins over train.epochs
    ({"train": {"label_smothing": 0.1}}, "regularise.label_smoothing"),  # misspelt and misplaced
    ({"train": {"epoch": 2}}, "train.epochs"),  # misspelt in the right section: the existing hint
    ({"generate": {"temprature": 1}}, "generate.temperature"),
])
def test_a_key_in_the_wrong_section_says_where_it_belongs(given, expected):
    with pytest.raises(ConfigError, match=f"did you mean '{expected}'\\?"):
        build_config(given)


def test_a_key_found_in_several_sections_lists_them():
    with pytest.raises(ConfigError, match=r"did you mean 'method.lora.alpha'\? \(or 'regularise.adversarial.alpha'\)"):
        build_config({"alpha": 8})


def test_cross_key_checks_name_both_keys_on_one_line():
    with pytest.raises(ConfigError, match=r"^invalid configuration in <config>: eval.metric 'accuracy' needs "
                                          r"eval.task"):
        build_config({"eval": {"metric": "accuracy"}})
    with pytest.raises(ConfigError) as info:
        build_config({"train": {"batch_size": "eight", "lr": -1}})
    assert "'train.batch_size'" in str(info.value) and "'train.lr'" in str(info.value) and "\n" not in str(info.value)


def test_unreadable_config_files_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a config file"):
        load_config(tmp_path)
    garbage = tmp_path / "garbage.yaml"
    garbage.write_text("train: [unclosed\n  : :\n")
    with pytest.raises(ConfigError, match=r"garbage.yaml is not valid YAML: .* at line \d+, column \d+") as info:
        load_config(garbage)
    assert "\n" not in str(info.value)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ConfigError, match="binary.yaml is not UTF-8 text"):
        load_config(binary)


# ---------------------------------------------------------------- descriptions (the README's reference is written from them)


@pytest.mark.parametrize("path,field", LEAVES, ids=[".".join(p) for p, _ in LEAVES])
def test_every_key_has_a_description(path, field):
    assert field.description and field.description.strip(), ".".join(path)


def test_every_section_has_a_docstring_and_a_description():
    classes = {(): Config}
    for path in sorted({p[:-1] for p in schema_paths()} - {()}, key=len):  # parents before their subsections
        field = classes[path[:-1]].model_fields[path[-1]]
        classes[path] = field.annotation
        assert field.description and (field.annotation.__doc__ or "").strip(), ".".join(path)
    assert ("eval", "early_stopping") in classes and len(classes) > 15


def test_a_lora_key_under_method_points_to_method_lora():
    with pytest.raises(ConfigError, match=r"unknown key 'method.r': did you mean 'method.lora.r'\?"):
        build_config({"method": {"r": 4}})


# ---------------------------------------------------------------- the eval section and keys that moved


def test_eval_task_auto_and_the_metric_check():
    assert build_config({"eval": {"task": "auto"}}).eval.task is None  # auto: detected (training: loss only)
    with pytest.raises(ConfigError, match=r"'eval.task': unknown task 'poetry': use one of auto, classification"):
        build_config({"eval": {"task": "poetry"}})
    with pytest.raises(ConfigError, match="eval.metric 'rougeL' is not a classification metric"):
        build_config({"eval": {"task": "classification", "metric": "rougeL"}})
    with pytest.raises(ConfigError, match="eval.metric 'perplexity' needs eval.task"):
        build_config({"eval": {"task": "perplexity", "metric": "perplexity"}})
    assert build_config({"eval": {"task": "json", "metric": "field_f1"}}).eval.metric == "field_f1"


OLD_TRAIN = {"eval_every": 5, "eval_task": "classification", "eval_mode": "generate", "eval_metric": "accuracy",
             "eval_sample": 12, "early_stopping": {"patience": 2, "enabled": False}}


def test_moved_keys_are_read_at_their_new_place_with_a_warning(caplog):
    given = {"train": {"lr": 1e-3, **OLD_TRAIN}}
    with caplog.at_level(logging.WARNING, logger="fewtune.config"):
        cfg = build_config(given, source="old.yaml")
    e = cfg.eval
    assert (e.every, e.task, e.mode, e.metric, e.sample) == (5, "classification", "generate", "accuracy", 12)
    assert (e.early_stopping.patience, e.early_stopping.enabled, e.early_stopping.min_delta) == (2, False, 0.0)
    assert cfg.train.lr == 1e-3 and given == {"train": {"lr": 1e-3, **OLD_TRAIN}}  # the caller's mapping is kept
    [record] = caplog.records  # one warning for all of them, naming each new key
    for old, new in MOVED_KEYS.items():
        assert (f"{old} -> {new}" in record.getMessage()) == old.startswith("train.")
    assert record.getMessage().startswith("old.yaml: ")
    # the same as the new spelling
    new = {"train": {"lr": 1e-3}, "eval": {"every": 5, "task": "classification", "mode": "generate",
                                           "metric": "accuracy", "sample": 12,
                                           "early_stopping": {"patience": 2, "enabled": False}}}
    assert build_config(new) == cfg


def test_moved_keys_in_overrides_and_conflicts(caplog):
    with caplog.at_level(logging.WARNING, logger="fewtune.config"):
        cfg = build_config({"eval": {"every": 9}}, ["train.eval_every=3", "train.early_stopping.patience=4"])
    assert cfg.eval.every == 3 and cfg.eval.early_stopping.patience == 4  # an override wins, as any override does
    assert "'train.eval_every' has moved to 'eval.every'" in caplog.text
    assert "'train.early_stopping.patience' has moved to 'eval.early_stopping.patience'" in caplog.text
    assert build_config({"train": {"eval_every": 3}, "eval": {"every": 3}}).eval.every == 3  # both, agreeing
    with pytest.raises(ConfigError, match=r"both 'train.eval_every' \(3\) and 'eval.every' \(9\) are set; "
                                          r"'train.eval_every' has moved to 'eval.every': keep only 'eval.every'"):
        build_config({"train": {"eval_every": 3}, "eval": {"every": 9}})
    with pytest.raises(ConfigError, match=r"'eval.task': unknown task"):  # a bad old value is named at its new key
        build_config({"train": {"eval_task": "poetry"}})
    assert moved_key("train.early_stopping.min_delta") == "eval.early_stopping.min_delta"
    assert moved_key("train.eval_everything") is None and moved_key("train.lr") is None


def test_an_old_run_directory_config_loads(tmp_path, caplog):
    """A run's config.yaml as an older fewtune wrote it (every default written out, the old keys)."""
    import yaml

    old = build_config({}).model_dump(mode="json")
    del old["eval"]  # the section did not exist then
    old["regularise"].update(replay=old["data"].pop("replay"), curriculum=old["data"].pop("curriculum"))
    old["regularise"]["curriculum"]["order"] = "length"
    old["train"].update({"eval_every": 20, "eval_task": None, "eval_mode": "choice", "eval_metric": "loss",
                         "eval_sample": None, "early_stopping": {"enabled": True, "patience": 3, "min_delta": 0.0}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="fewtune.config"):
        cfg = load_config(path, ["train.output_dir=/tmp/x", "train.resume=true"])  # as `train --resume` reads it
    assert cfg.eval.every == 20 and cfg.eval.task is None and cfg.train.resume
    assert cfg == build_config({"eval": {"every": 20}, "train": {"output_dir": "/tmp/x", "resume": True},
                                "data": {"curriculum": {"order": "length"}}})
    assert str(path) in caplog.text and "train.eval_every -> eval.every" in caplog.text


def test_replay_and_curriculum_moved_to_data(tmp_path, caplog):
    general = tmp_path / "general.jsonl"
    general.write_text('{"prompt": "a", "completion": "b"}\n', encoding="utf-8")
    path = tmp_path / "old.yaml"
    path.write_text("regularise:\n  replay: {general: general.jsonl, ratio: 0.5}\n  curriculum: {order: loss}\n"
                    "  label_smoothing: 0.1\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="fewtune.config"):
        cfg = load_config(path)
    assert cfg.data.replay.general == str(general) and cfg.data.replay.ratio == 0.5  # relative to the file
    assert cfg.data.curriculum.order == "loss" and cfg.regularise.label_smoothing == 0.1
    assert "regularise.replay -> data.replay" in caplog.text and "regularise.curriculum -> data.curriculum" in caplog.text
    assert "replay" not in Config.model_fields["regularise"].annotation.model_fields
