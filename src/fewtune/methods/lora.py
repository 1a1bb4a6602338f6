"""LoRA (with DoRA and rsLoRA as its flags) and QLoRA: LoRA on a 4-bit base (bitsandbytes, CUDA only)."""

from __future__ import annotations

import torch

from fewtune.config import MethodSection, ModelSection
from fewtune.methods import MethodError


def lora_config(method: MethodSection, **options):
    """peft's LoraConfig from method.lora; ``options`` override its fields (a registry entry's variant)."""
    from peft import LoraConfig

    lora = method.lora
    settings = dict(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                    use_dora=lora.use_dora, use_rslora=lora.use_rslora, task_type="CAUSAL_LM")
    return LoraConfig(**{**settings, **options})


def apply_lora(model, method: MethodSection, model_name: str | None = None, **options):
    from peft import get_peft_model

    from fewtune.methods.fast_dropout import use_fast_lora_dropout
    from fewtune.methods.fast_lora import use_fast_lora_forward

    model = get_peft_model(model, lora_config(method, **options))
    use_fast_lora_dropout(model)  # same dropout, a quarter of the random numbers (fast_dropout.py)
    use_fast_lora_forward(model)  # fewer passes over the activations in CPU training (fast_lora.py)
    return model


def apply_qlora(model, method: MethodSection, model_name: str | None = None, **options):
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, lora_config(method, **options))


def check_qlora_supported() -> None:
    if not torch.cuda.is_available():
        raise MethodError("method.name=qlora needs a CUDA GPU: bitsandbytes 4-bit weights do not run on this "
                          "machine's CPU. Use method.name=lora here (same adapter, full-precision base).")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MethodError("method.name=qlora needs the bitsandbytes package: pip install bitsandbytes") from None


def load_4bit_base(model_section: ModelSection, method: MethodSection):
    """The base in 4 bits for QLoRA (compute in bf16 where the GPU has it, else fp16)."""
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
