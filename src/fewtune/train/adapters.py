"""The peft methods besides plain LoRA: DoRA/rsLoRA flags, QLoRA, IA3 and the prompt-learning family.

Each is a peft config built from its config section; peft does the work. Prompt tuning,
P-tuning and prefix tuning train virtual tokens in front of (or, for prefix tuning, inside
the attention of) a frozen model; IA3 learns scaling vectors. QLoRA loads the base in 4
bits through bitsandbytes, which needs a CUDA GPU.
"""

from __future__ import annotations

import torch

from fewtune.config import MethodSection, ModelSection

PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")
PEFT_METHODS = ("lora", "qlora", "ia3", *PROMPT_METHODS)


class MethodError(ValueError):
    """A method that cannot run here (QLoRA without CUDA) or cannot do what was asked (export)."""


def lora_config(method: MethodSection):
    from peft import LoraConfig

    lora = method.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                      use_dora=lora.use_dora, use_rslora=lora.use_rslora, task_type="CAUSAL_LM")


def prompt_config(method: MethodSection, model, tokenizer_path: str | None = None):
    from peft import (PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, PromptTuningInit)

    p = method.prompt
    if method.name == "prompt_tuning":
        if p.init_text:
            if tokenizer_path is None:
                raise MethodError("method.prompt.init_text needs the tokenizer's path")
            from fewtune.models import resolve_model_path

            tokenizer_path = resolve_model_path(tokenizer_path)  # embedded names resolve to their folder
            return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p.num_virtual_tokens,
                                      prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=p.init_text,
                                      tokenizer_name_or_path=tokenizer_path)
        # peft's RANDOM init draws N(0, 1) vectors, far from the scale of real token embeddings;
        # embeddings of sampled vocabulary tokens start where the model's inputs live
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p.num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    if method.name == "p_tuning":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=p.num_virtual_tokens,
                                   encoder_hidden_size=p.encoder_hidden_size)
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p.num_virtual_tokens)


def ia3_config(method: MethodSection):
    from peft import IA3Config

    ia3 = method.ia3
    extra = {}
    if ia3.target_modules is not None:
        extra["target_modules"] = ia3.target_modules
        # peft requires the feed-forward set to be a subset of the targets
        extra["feedforward_modules"] = ia3.feedforward_modules or []
    elif ia3.feedforward_modules is not None:
        raise MethodError("method.ia3.feedforward_modules needs method.ia3.target_modules too")
    return IA3Config(task_type="CAUSAL_LM", **extra)


def apply_peft(model, method: MethodSection, tokenizer_path: str | None = None):
    """Wrap the model in the configured peft method (everything but 'full')."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if method.name in ("lora", "qlora"):
        if method.name == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return get_peft_model(model, lora_config(method))
    if method.name == "ia3":
        return get_peft_model(model, ia3_config(method))
    if method.name in PROMPT_METHODS:
        return get_peft_model(model, prompt_config(method, model, tokenizer_path))
    raise MethodError(f"unknown method.name '{method.name}'")


def check_qlora_supported() -> None:
    if not torch.cuda.is_available():
        raise MethodError("method.name=qlora needs a CUDA GPU: bitsandbytes 4-bit weights do not run on this "
                          "machine's CPU. Use method.name=lora here (same adapter, full-precision base).")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MethodError("method.name=qlora needs the bitsandbytes package: pip install bitsandbytes") from None


def load_base(model_section: ModelSection, method: MethodSection):
    """The base model as the method needs it: 4-bit for QLoRA, as configured otherwise."""
    from fewtune.models import load_model

    if method.name != "qlora":
        return load_model(model_section.name, model_section.dtype)
    check_qlora_supported()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fewtune.models import resolve_dtype, resolve_model_path

    compute = resolve_dtype(model_section.dtype)
    if compute in (None, "auto", torch.float32):
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method.qlora.quant_type,
                               bnb_4bit_use_double_quant=method.qlora.double_quant, bnb_4bit_compute_dtype=compute)
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(model_section.name), quantization_config=quant,
                                                dtype=compute, device_map={"": torch.cuda.current_device()})


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
