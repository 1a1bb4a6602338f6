"""The one typed configuration: a section per stage, mirrored key for key by the YAML files.

Unknown or misspelled keys are errors that name the nearest valid key; command-line
overrides use dotted keys (``train.lr=2e-4``) and are parsed as YAML scalars.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fewtune.data.formats import FORMATS
from fewtune.methods import DEFAULT_LR, METHOD_NAMES


class ConfigError(ValueError):
    """A configuration problem, worded for the user (key path, what is wrong, what to use)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# metrics train.eval_metric can select (all: higher is better), as fewtune.eval computes them
TASK_METRICS = {
    "classification": ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall"),
    "generation": ("rouge1", "rouge2", "rougeL", "bleu", "exact_match"),
    "json": ("json_valid", "exact_match", "field_f1", "field_precision", "field_recall"),
}


class ModelSection(Section):
    name: str = "smollm2-135m-instruct"  # embedded name, local folder, .gguf file or hub id
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # chat: the tokenizer's chat template; plain: prompt + separator, completion + stop
    template: Literal["auto", "chat", "plain"] = "auto"
    separator: str = "\n\n###\n\n"
    stop: str = " END"


class DataSection(Section):
    train: str | None = None
    validation: str | None = None  # a file; when empty, val_ratio of train is held out
    val_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    format: Literal[("auto", *FORMATS)] = "auto"  # the entries of fewtune.data.formats' table
    dataset: str | None = None  # name inside a LLaMA-Factory dataset_info.json given as `train`
    system_prompt: str | None = None  # used when an example has no system message of its own
    max_length: int = Field(512, gt=8)
    prompt_loss_weight: float = Field(0.0, ge=0.0, le=1.0)
    # error: stop before training on an example with nothing left to learn; drop: skip and count it
    on_bad_example: Literal["error", "drop"] = "error"
    seed: int = 42


class LoraSection(Section):
    r: int = Field(8, gt=0)
    alpha: float = 16.0
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    use_dora: bool = False  # weight-decomposed LoRA (magnitude + direction)
    use_rslora: bool = False  # scale by alpha / sqrt(r) instead of alpha / r: stable at higher ranks


class PromptSection(Section):
    """prompt_tuning, p_tuning and prefix_tuning: trained virtual tokens, the model frozen."""

    num_virtual_tokens: int = Field(20, gt=0)
    init_text: str | None = None  # prompt_tuning: start from this text's embeddings (None: sampled vocabulary)
    encoder_hidden_size: int = Field(128, gt=0)  # p_tuning: the prompt encoder's MLP width


class IA3Section(Section):
    target_modules: list[str] | None = None  # None: peft's defaults for the architecture
    feedforward_modules: list[str] | None = None


class QLoraSection(Section):
    """qlora: the base loaded in 4 bits (bitsandbytes, CUDA only), a LoRA adapter (method.lora) on top."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


class FullSection(Section):
    freeze_embeddings: bool = False
    train_top_layers: int | None = Field(None, ge=0)  # train only the top N transformer blocks
    freeze_patterns: list[str] = []  # parameter-name regexes to freeze


class MethodSection(Section):
    name: Literal[METHOD_NAMES] = "lora"  # the entries of fewtune.methods.METHODS
    lora: LoraSection = LoraSection()
    full: FullSection = FullSection()
    prompt: PromptSection = PromptSection()
    ia3: IA3Section = IA3Section()
    qlora: QLoraSection = QLoraSection()


class EarlyStoppingSection(Section):
    enabled: bool = True
    patience: int = Field(3, ge=1)  # evaluations without improvement before stopping
    min_delta: float = Field(0.0, ge=0.0)


class TrainSection(Section):
    output_dir: str = "runs/run"
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; overrides epochs when set
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    group_by_length: bool = True  # batches of similar length: less padding, same examples per epoch
    lr: float | None = Field(None, gt=0)  # None: 1e-4 for LoRA, 1e-5 for full fine-tuning
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "cosine_with_restarts", "constant"] = "cosine"
    num_cycles: int = Field(2, ge=1)  # for cosine_with_restarts
    eval_every: int | None = Field(None, gt=0)  # steps since the last evaluation; one also runs at each epoch end
    # the task metric on the validation set at every evaluation (null: validation loss only)
    eval_task: Literal["classification", "generation", "json"] | None = None
    eval_mode: Literal["choice", "generate"] = "choice"  # classification: score each label, or generate
    eval_metric: str = "loss"  # picks the best checkpoint and early-stops: loss, or a metric of eval_task (ties: lower loss)
    eval_sample: int | None = Field(None, gt=0)  # task metric on this many validation examples (seeded sample)
    early_stopping: EarlyStoppingSection = EarlyStoppingSection()
    save_every: int | None = Field(None, gt=0)  # steps; a checkpoint is also written at each epoch end
    keep_checkpoints: int = Field(2, ge=1)
    # auto: bf16 on GPUs that have it (else fp16 with loss scaling); on CPU bf16 only if a probe finds it faster
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    packing: bool = True  # a micro-batch is one row without padding; attention stays inside each example
    share_prefix: bool = True  # with packing: a token prefix common to a micro-batch is computed once
    loss_chunk_size: int | None = Field(None, gt=0)  # positions per output-layer chunk; None: ~128 MB of logits
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, one more forward
    num_threads: int | None = Field(None, gt=0)  # CPU threads per process; None: available cores / processes
    cache_tokenized: bool = True  # keep rendered token ids on disk (resumes, sweeps)
    seed: int = 42
    resume: bool = False
    force_resume: bool = False  # resume even if the data, model or training keys changed since the checkpoint
    log_every: int = Field(1, gt=0)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        # YAML 1.1 reads a bare `no` (train.mixed_precision=no on the command line) as false
        return "no" if value is False else value

    @model_validator(mode="after")
    def _check_eval_metric(self) -> "TrainSection":
        if self.eval_metric == "loss":
            return self
        if self.eval_task is None:
            raise ValueError(f"train.eval_metric '{self.eval_metric}' needs train.eval_task (classification, "
                             "generation or json)")
        if self.eval_metric not in TASK_METRICS[self.eval_task]:
            raise ValueError(f"train.eval_metric '{self.eval_metric}' is not a {self.eval_task} metric; "
                             f"use loss or one of {', '.join(TASK_METRICS[self.eval_task])}")
        return self

    def resolved_lr(self, method: str) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(method, 1e-4)




class AdversarialSection(Section):
    """Adversarial training on the embedding layer's output (FGM: one step; PGD: K projected steps)."""

    kind: Literal["none", "fgm", "pgd"] = "none"
    epsilon: float = Field(1.0, gt=0)  # largest perturbation per token (L2 norm of its embedding change)
    alpha: float = Field(0.3, gt=0)  # PGD step size
    steps: int = Field(3, ge=1)  # PGD steps K


class ReplaySection(Section):
    general: str | None = None  # a general data set mixed into training (fewtune data mix) against forgetting
    ratio: float = Field(1.0, gt=0)  # general examples per training example


class EwcSection(Section):
    general: str | None = None  # general data the Fisher information is estimated on
    weight: float = Field(0.0, ge=0)  # penalty weight lambda; 0 turns EWC off
    samples: int = Field(64, gt=0)  # general examples used for the Fisher estimate


class CurriculumSection(Section):
    order: Literal["none", "length", "loss"] = "none"  # easy to hard: short first, or low base-model loss first
    buckets: int = Field(4, ge=1)  # examples are shuffled within each difficulty bucket
    epochs: int = Field(1, ge=1)  # epochs in curriculum order; later epochs are shuffled as usual


class RegulariseSection(Section):
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # on completion tokens, training loss only
    neftune_alpha: float = Field(0.0, ge=0)  # NEFTune noise on the embeddings while training (paper: 5)
    adversarial: AdversarialSection = AdversarialSection()
    replay: ReplaySection = ReplaySection()
    ewc: EwcSection = EwcSection()
    curriculum: CurriculumSection = CurriculumSection()


class GenerateSection(Section):
    max_new_tokens: int = Field(128, gt=0)
    temperature: float = Field(0.0, ge=0)  # 0 means greedy
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: list[str] = []  # extra stop strings, cut from the output
    num_return_sequences: int = Field(1, gt=0)
    seed: int = 0
    batch_size: int = Field(16, gt=0)


class Config(Section):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    method: MethodSection = MethodSection()
    train: TrainSection = TrainSection()
    regularise: RegulariseSection = RegulariseSection()
    generate: GenerateSection = GenerateSection()

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.method.name == "full" and self.method.lora != LoraSection():
            pass  # harmless: lora settings are ignored for full fine-tuning
        ewc = self.regularise.ewc
        if ewc.weight > 0 and not ewc.general:
            raise ValueError("regularise.ewc.weight > 0 needs regularise.ewc.general (a general data file)")
        return self


def _section_class(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _fields_at(path: tuple[Any, ...]) -> list[str]:
    """Valid keys of the section at a key path (for 'did you mean')."""
    cls: type[BaseModel] = Config
    for part in path:
        field = cls.model_fields.get(str(part))
        sub = _section_class(field.annotation) if field is not None else None
        if sub is None:
            return []
        cls = sub
    return list(cls.model_fields)


def schema_paths(cls: type[BaseModel] | None = None, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of the schema, sections and leaves: ('train',), ('train', 'lr'), ..."""
    out = []
    for name, field in (cls or Config).model_fields.items():
        path = (*prefix, name)
        out.append(path)
        sub = _section_class(field.annotation)
        if sub is not None:
            out += schema_paths(sub, path)
    return out


def _ranked(candidates: list[tuple[str, ...]], parent: tuple[str, ...]) -> list[str]:
    """Candidate key paths, those sharing the most of the given key's sections first, then the shortest."""
    def shared(path: tuple[str, ...]) -> int:
        n = 0
        for a, b in zip(path, parent):
            if a != b:
                break
            n += 1
        return n

    return [".".join(p) for p in sorted(candidates, key=lambda p: (-shared(p), len(p), p))]


def _did_you_mean(paths: list[str]) -> str:
    also = f" (or {', '.join(repr(p) for p in paths[1:3])})" if len(paths) > 1 else ""
    return f"did you mean '{paths[0]}'?{also}"


def suggest_key(loc: tuple[Any, ...]) -> str:
    """The hint for an unknown key: the same key in another section, a near spelling here, or the valid keys."""
    parent, name = tuple(str(p) for p in loc[:-1]), str(loc[-1])
    everywhere = schema_paths()
    elsewhere = [p for p in everywhere if p[-1] == name and p[:-1] != parent]
    if elsewhere:  # a key put in the wrong section (method.r, train.label_smoothing, lr at the top level)
        return _did_you_mean(_ranked(elsewhere, parent))
    valid = _fields_at(parent)
    here = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    there = difflib.get_close_matches(name, sorted({p[-1] for p in everywhere} - set(valid)), n=1, cutoff=0.75)
    ratio = lambda other: difflib.SequenceMatcher(None, name, other).ratio()  # noqa: E731
    if there and (not here or ratio(there[0]) > ratio(here[0]) + 0.1):  # misspelt and in the wrong section
        return _did_you_mean(_ranked([p for p in everywhere if p[-1] == there[0]], parent))
    if here:  # a misspelling in the right section
        return _did_you_mean([".".join([*parent, here[0]])])
    return f"valid keys{' in ' + '.'.join(parent) if parent else ''}: {', '.join(valid)}"


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _key_of(loc: tuple[Any, ...]) -> str:
    """The user's key path of an error location: schema keys, list positions as [i]; pydantic's union tags dropped."""
    known, parts, key = set(schema_paths()), [], ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif (*parts, str(part)) in known or not parts or (*parts,) not in known:
            parts.append(str(part))
            key += ("." if len(parts) > 1 else "") + str(part)
    return key


def _explain(err: ValidationError, source: str) -> ConfigError:
    problems: dict[str, list[str]] = {}  # key -> what is wrong (a union's members each say what they take)
    got: dict[str, Any] = {}
    for e in err.errors():
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            problems.setdefault(f"unknown key '{'.'.join(map(str, loc))}': {suggest_key(loc)}", [])
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "value_error" and isinstance(e.get("input"), dict):  # a section's check across keys
            problems.setdefault(msg, [])  # worded with the key paths it is about
            continue
        key = _key_of(loc)
        whats = problems.setdefault(f"'{key}'", [])
        if msg not in whats:
            whats.append(msg if not whats else msg.removeprefix("Input should be "))
        got[f"'{key}'"] = e.get("input")
    lines = [f"{head}: {' or '.join(whats)} (got {_short_repr(got[head])})" if whats else head
             for head, whats in problems.items()]
    return ConfigError(f"invalid configuration in {source}: " + "; ".join(lines))


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[path[-1]] = value
    return data


def build_config(data: dict | None = None, overrides: list[str] | None = None, source: str = "<config>") -> Config:
    data = apply_overrides(dict(data or {}), overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise _explain(err, source) from None


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own message spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    what = getattr(err, "problem", None) or " ".join(str(err).split())
    context = getattr(err, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{what}{where}" + (f" ({context})" if context else "")


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if path.is_dir():
        hint = f" (the run's config is {path / 'config.yaml'})" if (path / "config.yaml").is_file() else ""
        raise ConfigError(f"{path} is a directory, not a config file{hint}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}): "
                          "is it a config file?") from None
    except OSError as err:
        raise ConfigError(f"{path} cannot be read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, method, train, regularise, generate)")
    cfg = build_config(data, overrides, source=str(path))
    # relative data paths are relative to the config file, as a user reading it expects
    for key in ("train", "validation"):
        value = getattr(cfg.data, key)
        if value and not Path(value).is_absolute() and not Path(value).exists():
            candidate = path.parent / value
            if candidate.exists():
                setattr(cfg.data, key, str(candidate))
    for section in (cfg.regularise.replay, cfg.regularise.ewc):
        if section.general and not Path(section.general).is_absolute() and not Path(section.general).exists():
            if (path.parent / section.general).exists():
                section.general = str(path.parent / section.general)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True), encoding="utf-8")
