"""Grouped-query attention with a mask on a CPU, without copying keys and values for every query head.

transformers' SDPA attention repeats each key/value head for the query heads that read it
(``repeat_kv``) whenever an attention mask is given, because CUDA's fast kernels refuse
``enable_gqa`` with a mask. PyTorch's CPU kernel takes it. Choice scoring always passes a mask
(left-padded prompts, then every label of an example packed into one row behind a 4-D mask),
so on a CPU each layer copied its cache three times over for SmolLM2's 9 query / 3 key-value
heads. Measured on AMX (2 threads, batch 100, bf16): 5.1 -> 4.4 ms a call for the label rows,
3.0 -> 2.5 ms for the prompts; in fp32 9.9 -> 5.4 ms; the results are the kernel's own (the same
error against an fp32 reference).

Everything else (no mask, one query token, a GPU, training, features SDPA handles specially)
goes to transformers' own function unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "fewtune_sdpa"
_SPECIAL = ("softcap", "s_aux", "position_bias")  # given (not None): transformers' own function handles them


def gqa_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """Same signature and output as transformers' ``sdpa_attention_forward``: (batch, tokens, heads, dim)."""
    if (query.device.type != "cpu" or attention_mask is None or query.shape[2] == 1
            or key.shape[1] == query.shape[1] or query.shape[1] % key.shape[1]
            or (torch.is_grad_enabled() and query.requires_grad) or kwargs.get("output_attentions")
            or any(kwargs.get(k) is not None for k in _SPECIAL)):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, gqa_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_gqa_attention(model) -> bool:
    """Switch a loaded model whose attention is transformers' SDPA to this one when it runs on a CPU
    with grouped-query attention (fewer key/value heads than query heads). True when switched."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    params = next(iter(model.parameters()), None)
    if params is None or params.device.type != "cpu":
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads, kv_heads = getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None)
    if not heads or not kv_heads or kv_heads >= heads:
        return False
    register()
    config._attn_implementation = NAME
    if text is not config and getattr(text, "_attn_implementation", None) == "sdpa":
        text._attn_implementation = NAME
    return True
