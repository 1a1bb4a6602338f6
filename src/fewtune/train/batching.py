"""Turning rendered examples into model inputs: padded batches, or packed rows without padding.

Packed (``train.packing``): the examples of a micro-batch are laid end to end in one row,
position ids restart at every example, and attention stays inside each example (see
``packed_attention``). With ``train.share_prefix``, the longest token prefix that all the
examples of the micro-batch have in common (a system prompt, a fixed instruction) is laid
down once; every example continues from it with position ids that continue the prefix,
and attends to it. That is the same computation as running each example in full: the
prefix's hidden states do not depend on what follows it (causal attention), so computing
them once per micro-batch gives the same loss and gradients with less work. (With LoRA
dropout on, the examples then share one dropout mask on the prefix tokens: each example's
mask has the same distribution as before, but the masks are not independent across the
micro-batch. With dropout 0 the two computations are the same.)

The loss is taken from an explicit list of (row position, target token, weight): the
hidden state at a row position predicts the next token of its example. The last prefix
token predicts the first token of every example's own part, so it may appear several
times; targets inside the shared prefix are the same for every example and appear once
with the examples' weights added up.
"""

from __future__ import annotations

import logging

import torch

from fewtune.data.render import Rendered
from fewtune.train.packed_attention import LAYOUT_KEYS

log = logging.getLogger(__name__)

MIN_SHARED_PREFIX = 4  # shorter common prefixes are not worth an extra segment


def collate(items: list[Rendered], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding has attention 0 and loss weight 0. Items with images add the pixel inputs
    their model takes (``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``: fewtune.vision)."""
    width = max(len(r) for r in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    weights = torch.zeros((len(items), width), dtype=torch.float32)
    for row, r in enumerate(items):
        n = len(r)
        ids[row, :n] = torch.tensor(r.input_ids)
        mask[row, :n] = 1
        weights[row, :n] = torch.tensor(r.loss_weights)
    batch = {"input_ids": ids, "attention_mask": mask, "loss_weights": weights}
    images = [ref for r in items for ref in r.images]
    if images:
        vision = next(r.vision for r in items if r.images)
        keys = [(len(r), j) for r in items for j in range(len(r.images))]  # the augmentation draw of each image
        batch.update(vision.batch_inputs(ids, images, [len(r.images) for r in items], keys))
    return batch


def common_prefix_length(items: list[Rendered]) -> int:
    """Length of the token prefix shared by all items, leaving every item at least one token of its own."""
    if len(items) < 2:
        return 0
    first = items[0].input_ids
    limit = min(len(r) for r in items) - 1
    n = 0
    while n < limit and all(r.input_ids[n] == first[n] for r in items):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


def pack(items: list[Rendered], share_prefix: bool = True) -> dict[str, torch.Tensor]:
    """One packed row for a micro-batch (see the module docstring for the layout)."""
    if any(r.images for r in items):
        raise ValueError("examples with images are not packed (their M-RoPE positions restart per image grid); "
                         "training turns packing off for vision-language models")
    shared = common_prefix_length(items) if share_prefix else 0
    tokens: list[int] = list(items[0].input_ids[:shared])
    positions: list[int] = list(range(shared))
    # segments: (first row position, length, first position id); the prefix is segment 0 when shared
    segments: list[tuple[int, int, int]] = [(0, shared, 0)] if shared else []
    targets: dict[tuple[int, int], float] = {}  # (row position predicting, target token) -> weight
    for r in items:
        start = len(tokens)
        own = r.input_ids[shared:]
        tokens.extend(own)
        positions.extend(range(shared, len(r)))
        segments.append((start, len(own), shared))
        for j in range(1, len(r)):  # token j is predicted by token j-1
            w = float(r.loss_weights[j])
            if w <= 0:
                continue
            row = j - 1 if j - 1 < shared else start + (j - 1 - shared)
            key = (row, r.input_ids[j])
            targets[key] = targets.get(key, 0.0) + w
    keys = sorted(targets)
    batch = {
        "input_ids": torch.tensor([tokens], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "loss_index": torch.tensor([k[0] for k in keys], dtype=torch.long),
        "targets": torch.tensor([k[1] for k in keys], dtype=torch.long),
        "weights": torch.tensor([targets[k] for k in keys], dtype=torch.float32),
    }
    batch.update(_attention_layout(segments, shared, len(tokens)))
    return batch


def _attention_layout(segments: list[tuple[int, int, int]], shared: int, total: int) -> dict[str, torch.Tensor]:
    """Gather indices and masks for ``packed_attention``: one padded block row per segment."""
    n = len(segments)
    q_width = max(length for _, length, _ in segments)
    # the prefix segment sees only itself; the others see the prefix, then themselves
    k_width = max((0 if (start == 0 and shared) else shared) + length for start, length, _ in segments)
    q_index = torch.zeros((n, q_width), dtype=torch.long)
    k_index = torch.zeros((n, k_width), dtype=torch.long)
    q_pos = torch.zeros((n, q_width), dtype=torch.long)
    k_pos = torch.full((n, k_width), -(10 ** 9), dtype=torch.long)
    mask = torch.zeros((n, 1, q_width, k_width), dtype=torch.bool)
    out_index = torch.empty(total, dtype=torch.long)
    for s, (start, length, first_pos) in enumerate(segments):
        own = torch.arange(start, start + length)
        context = torch.arange(0, shared) if (shared and s > 0) else torch.arange(0)
        keys = torch.cat([context, own])
        q_index[s, :length] = own
        k_index[s, :len(keys)] = keys
        q_pos[s, :length] = torch.arange(first_pos, first_pos + length)
        k_pos[s, :len(keys)] = torch.cat([torch.arange(0, len(context)), torch.arange(first_pos, first_pos + length)])
        c = len(context)
        mask[s, 0, :length, :c] = True
        mask[s, 0, :length, c:c + length] = torch.ones(length, length, dtype=torch.bool).tril()
        mask[s, 0, length:, 0] = True  # padded query rows look at one real key, so softmax stays finite
        out_index[own] = s * q_width + torch.arange(length)
    return dict(zip(LAYOUT_KEYS, (q_index, k_index, mask, out_index, q_pos, k_pos)))


def batch_weight(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Total loss weight of a batch (the first token of an example is never a target)."""
    if "weights" in batch:
        return batch["weights"].sum()
    return batch["loss_weights"][:, 1:].sum()


def is_packed(batch: dict[str, torch.Tensor]) -> bool:
    return "loss_index" in batch


def _probe_items(vocab_size: int) -> list[Rendered]:
    """Three short examples with a common prefix and different lengths, tokens inside any vocabulary."""
    top = max(8, min(vocab_size, 1000))
    ids = [(7 * i + 3) % top for i in range(40)]
    rows = [ids[:10] + ids[20:20 + n] for n in (3, 7, 5)]
    return [Rendered(r, [0.0] * 8 + [1.0] * (len(r) - 8)) for r in rows]


def setup_packing(loss_module, share_prefix: bool = True) -> bool:
    """Switch the model to packed attention if it supports it, after checking on a tiny batch
    that packed and padded inputs give the same loss. False (model unchanged) otherwise."""
    from fewtune.train.packed_attention import PackingUnsupported, attention_implementation, restore_attention, \
        use_packed_attention
    from fewtune.train.loss import _base_model

    base = _base_model(loss_module.model)
    current = attention_implementation(base)
    if not loss_module.selective:
        log.warning("packing is off: this model's output layer needs the full-logits path")
        return False
    if current not in ("sdpa", "eager"):
        log.warning("packing is off: it runs with sdpa or eager attention, this model uses %s", current)
        return False
    previous = use_packed_attention(base)
    items = _probe_items(base.get_output_embeddings().weight.shape[0])
    was_training = loss_module.training
    loss_module.eval()  # no dropout: both forms must see the same function
    try:
        with torch.no_grad():
            device = next(base.parameters()).device
            padded = loss_module(**{k: v.to(device) for k, v in collate(items, 0).items()})[0]
            packed = loss_module(**{k: v.to(device) for k, v in pack(items, share_prefix).items()})[0]
        # the loss is summed in float32 either way; bf16/fp16 weights round each form's activations differently
        low = next(base.parameters()).dtype != torch.float32
        ok = torch.allclose(padded.float(), packed.float(), rtol=2e-2 if low else 1e-4)
        if not ok:
            log.warning("packing is off: packed and padded losses differ on a test batch (%.6f vs %.6f)",
                        packed.item(), padded.item())
    except (PackingUnsupported, TypeError, RuntimeError, ValueError) as err:
        log.warning("packing is off: %s does not run with packed attention (%s)", type(base).__name__, err)
        ok = False
    finally:
        loss_module.train(was_training)
    if not ok:
        restore_attention(base, previous)
    return ok
