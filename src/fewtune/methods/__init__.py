"""What gets trained: one table of methods, each an entry naming its settings, learning rate and builder.

Adding a method is one entry in ``METHODS`` (and, if it has settings of its own, a section in
``fewtune.config.MethodSection``); ``method.name``'s allowed values and the default learning
rates are read from this table. Builders are named as ``"module:function"`` and imported only
when a run uses them, so reading the table (the config does) loads neither peft nor torch.

This package is what inference needs to know about a trained model too (is it prompt learning,
can it be merged), so ``generate`` and ``export`` import it and no training code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module


class MethodError(ValueError):
    """A method that cannot run here (QLoRA without CUDA) or cannot do what was asked (export)."""


@dataclass(frozen=True)
class Method:
    name: str
    section: str | None  # the method.<section> holding its settings
    default_lr: float  # when train.lr is not set: what suits how much the method moves
    build: str  # "module:function": (model, method_section, model_name, **options) -> the model to train
    mergeable: bool  # `fewtune export --merged` can fold it into plain weights
    saves: str = "adapter"  # the run directory's folder for the result: adapter/ (peft) or model/
    base: str | None = None  # "module:function": (model_section, method_section) -> base, when not the usual load
    options: dict = field(default_factory=dict)  # passed to the builder: variants of one builder are one entry

    def builder(self):
        module, function = self.build.split(":")
        return getattr(import_module(module), function)


_LORA, _PEFT = "fewtune.methods.lora", "fewtune.methods.peft_methods"
METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered already")
    METHODS[method.name] = method
    return method


for _entry in (
    Method("lora", "lora", 1e-4, f"{_LORA}:apply_lora", mergeable=True),
    Method("full", "full", 1e-5, "fewtune.methods.full:apply_freezing", mergeable=True, saves="model"),
    Method("qlora", "lora", 1e-4, f"{_LORA}:apply_qlora", mergeable=True, base=f"{_LORA}:load_4bit_base"),
    Method("prompt_tuning", "prompt", 1e-2, f"{_PEFT}:apply_prompt_tuning", mergeable=False),
    Method("p_tuning", "prompt", 1e-2, f"{_PEFT}:apply_p_tuning", mergeable=False),
    Method("prefix_tuning", "prompt", 1e-2, f"{_PEFT}:apply_prefix_tuning", mergeable=False),
    Method("ia3", "ia3", 3e-3, f"{_PEFT}:apply_ia3", mergeable=True),
):
    register_method(_entry)

METHOD_NAMES = tuple(METHODS)
DEFAULT_LR = {name: m.default_lr for name, m in METHODS.items()}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MethodError(f"unknown method.name '{name}': use one of {', '.join(METHODS)}")
    return METHODS[name]


def load_base(model_section, method_section):
    """The base model as the method needs it (4 bits for QLoRA), else as configured."""
    entry = get_method(method_section.name)
    if entry.base is not None:
        module, function = entry.base.split(":")
        return getattr(import_module(module), function)(model_section, method_section)
    from fewtune.models import load_model

    return load_model(model_section.name, model_section.dtype)


def apply_method(model, method_section, model_name: str | None = None, vision_section=None):
    """The model ready to train with the configured method (a peft model, or the model with parts frozen).

    A vision-language model trains LoRA on its language model only; the vision tower stays frozen unless
    ``vision_section`` (config's model.vision) names the projector or top vision blocks to train in full."""
    entry = get_method(method_section.name)
    if getattr(model.config, "vision_config", None) is not None:
        from fewtune.vision import lora_targets, modules_to_train

        if entry.name != "lora":
            raise MethodError(f"method.name={entry.name}: vision-language models train with method.name=lora here "
                              "(LoRA on the language model, the vision tower frozen; model.vision trains more)")
        full = modules_to_train(model, getattr(vision_section, "train_projector", False),
                                getattr(vision_section, "train_vision_blocks", 0))
        options = {**entry.options, "target_modules": lora_targets(model, method_section.lora.target_modules),
                   "modules_to_save": full or None}
        return entry.builder()(model, method_section, model_name, **options)
    return entry.builder()(model, method_section, model_name, **entry.options)


def is_prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and getattr(config, "is_prompt_learning", False))


def virtual_tokens(model) -> int:
    """How many positions a prompt-learning PeftModel puts in front of the input (0 for prefix tuning)."""
    if not is_prompt_learning(model):
        return 0
    config = model.active_peft_config
    return 0 if config.peft_type.value == "PREFIX_TUNING" else config.num_virtual_tokens


def check_mergeable(model) -> None:
    if is_prompt_learning(model):
        kind = model.active_peft_config.peft_type.value.lower()
        raise MethodError(f"a {kind} run cannot be merged into a plain model: its virtual tokens are not weights "
                          "of the base. Use the run directory itself with `fewtune generate RUN_DIR`.")


def parameter_counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def trainable_state(model) -> dict:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict) -> None:
    import torch

    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[0]}): was it written with another method?")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
