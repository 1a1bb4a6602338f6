"""Attention for packed rows: each example attends only to itself (and to a shared prefix).

A packed micro-batch is one row of tokens: several examples back to back, or one prompt
prefix that all of them share followed by the part where each example differs. The
linear layers, norms and MLPs run on exactly these tokens (no padding anywhere). Only
attention needs to know where one example ends; it gathers every segment's queries and
keys into a small padded block, runs one ``scaled_dot_product_attention`` over all
segments, and scatters the result back. Compute is per segment, so it costs what
attention over the separate examples costs, never ``T**2`` of the whole row, and no
``T x T`` mask is ever built. On a GPU the same path runs SDPA's memory-efficient kernel.

The function is registered in transformers' attention interface under its own name. A
call without a packing layout (validation on padded batches, generation) goes straight
to transformers' own SDPA attention, so the model behaves exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "fewtune_packed"
# the keys a packed batch carries for attention (built once per micro-batch by batching.pack)
LAYOUT_KEYS = ("attn_q_index", "attn_k_index", "attn_mask", "attn_out_index", "attn_q_pos", "attn_k_pos")


class PackingUnsupported(RuntimeError):
    """The model asks attention for something the packed path does not implement."""


@dataclass
class PackedLayout:
    q_index: torch.Tensor  # (S, Q): row positions of each segment's queries (padded with 0)
    k_index: torch.Tensor  # (S, K): row positions of each segment's keys: shared prefix, then its own tokens
    mask: torch.Tensor  # (S, 1, Q, K) bool: causal inside a segment, the whole shared prefix visible
    out_index: torch.Tensor  # (T,): where each row position's output sits in the flattened (S*Q) block
    q_pos: torch.Tensor  # (S, Q) position ids of the queries (for sliding windows)
    k_pos: torch.Tensor  # (S, K) position ids of the keys

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor]) -> "PackedLayout":
        return cls(*(batch[k] for k in LAYOUT_KEYS))


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (heads, tokens, dim) at the row positions ``index`` (S, N): (S, heads, N, dim). The backward of
    index_select adds into the tokens with index_add_, which on a CPU took 23 ms over two profiled bf16 steps of
    train_speed.py against 63 ms for the accumulating index_put_ behind ``x[:, index]`` (indices repeat:
    padding, the shared prefix)."""
    picked = torch.index_select(x, 1, index.reshape(-1))
    return picked.view(x.shape[0], *index.shape, x.shape[-1]).transpose(0, 1)


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """Same signature and output as transformers' ``sdpa_attention_forward``: (batch, tokens, heads, dim)."""
    layout: PackedLayout | None = kwargs.pop("fewtune_layout", None)
    if layout is None:  # transformers' SDPA (without its key/value copies for a masked GQA call on a CPU)
        from fewtune.gqa_attention import gqa_attention_forward

        return gqa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     is_causal=is_causal, **kwargs)
    for feature in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(feature) is not None:
            raise PackingUnsupported(f"the packed attention path does not implement '{feature}'")
    if query.shape[0] != 1:
        raise PackingUnsupported("a packed batch is a single row")
    mask = layout.mask
    window = kwargs.get("sliding_window")
    if window:
        # transformers' convention: a query at position p sees keys at positions > p - window
        mask = mask & (layout.q_pos[:, None, :, None] - layout.k_pos[:, None, None, :] < window)
    heads, kv_heads = query.shape[1], key.shape[1]
    group = heads // kv_heads
    q = _gather(query[0], layout.q_index)  # (S, H, Q, D)
    k = _gather(key[0], layout.k_index)  # (S, Hkv, K, D)
    v = _gather(value[0], layout.k_index)
    segments, _, width, dim = q.shape
    if group > 1:
        # grouped-query attention without copying keys and values for every query head: the `group` query
        # heads that read one key/value head go one after another along the query axis (their rows are
        # independent: each query row attends by itself), and the mask repeats for each of them
        q = q.reshape(segments, kv_heads, group * width, dim)
        mask = mask.repeat(1, 1, group, 1)
    if q.device.type == "cpu" and (q.dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
        # PyTorch's CPU flash attention runs its backward pass about 4x slower in bf16 than in fp32 (measured on
        # AMX: 12 vs 3 ms a call), while the products around it gain from bf16: attention alone runs in fp32
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout,
                                                 scale=scaling).to(query.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
    out = out.reshape(segments, heads, width, dim)  # undo the grouping: (S, H, Q, D)
    out = out.transpose(1, 2).reshape(segments * width, heads, dim)[layout.out_index]  # (T, H, D)
    return out.unsqueeze(0), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # unpacked calls get SDPA's usual masks




def attention_implementation(model) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def use_packed_attention(model) -> str:
    """Switch ``model`` (a transformers model) to the packed attention; returns the previous name."""
    register()
    previous = attention_implementation(model)
    model.config._attn_implementation = NAME
    return previous


def restore_attention(model, previous: str | None) -> None:
    if previous is not None and attention_implementation(model) == NAME:
        model.config._attn_implementation = previous
