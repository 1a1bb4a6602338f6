"""What gets trained: a LoRA adapter (through peft) or the model itself with parts frozen."""

from __future__ import annotations

import re

import torch

from fewtune.config import MethodSection


def decoder_layers(model) -> torch.nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} (no .layers on its decoder)")
    return layers


def apply_lora(model, method: MethodSection):
    from peft import get_peft_model

    from fewtune.train.adapters import lora_config
    from fewtune.train.fast_dropout import use_fast_lora_dropout

    model = get_peft_model(model, lora_config(method))
    use_fast_lora_dropout(model)  # same dropout, a quarter of the random numbers (fast_dropout.py)
    return model


def apply_freezing(model, method: MethodSection):
    """Full fine-tuning, with the embeddings, the lower blocks, or named parameters frozen."""
    full = method.full
    for p in model.parameters():
        p.requires_grad_(True)
    if full.train_top_layers is not None:
        layers = decoder_layers(model)
        if full.train_top_layers > len(layers):
            raise ValueError(f"method.full.train_top_layers={full.train_top_layers} but the model has {len(layers)} blocks")
        keep = {id(p) for layer in list(layers)[len(layers) - full.train_top_layers:] for p in layer.parameters()}
        # the final norm sits above the top block: it trains with it
        norm = getattr(model.get_decoder(), "norm", None)
        if norm is not None:
            keep |= {id(p) for p in norm.parameters()}
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
    if full.freeze_embeddings:
        # with tied weights this also freezes the output layer, which is the same tensor
        for p in model.get_input_embeddings().parameters():
            p.requires_grad_(False)
    patterns = [re.compile(p) for p in full.freeze_patterns]
    for name, p in model.named_parameters():
        if any(pat.search(name) for pat in patterns):
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the freezing settings leave no parameter to train")
    return model


def apply_method(model, method: MethodSection, tokenizer_path: str | None = None):
    from fewtune.train.adapters import PEFT_METHODS, apply_peft

    if method.name == "lora":
        return apply_lora(model, method)
    if method.name == "full":
        return apply_freezing(model, method)
    if method.name in PEFT_METHODS:
        return apply_peft(model, method, tokenizer_path)
    raise ValueError(f"unknown method.name '{method.name}'")


def parameter_counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[0]}): was it written with another method?")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
