"""Full fine-tuning, with the embeddings, the lower blocks, or named parameters frozen."""

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


def apply_freezing(model, method: MethodSection, model_name: str | None = None):
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
