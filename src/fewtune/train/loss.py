"""Weighted next-token loss that computes the output layer only where loss is taken.

The vocabulary projection is a large share of a small model's compute (SmolLM2-135M:
28M of 135M parameters; Qwen's 152k vocabulary makes it larger still). Positions whose
target has zero loss weight (the prompt, padding) need no logits at all, so the decoder
runs on the whole row and the output layer only on the selected positions.

The selected positions go through the output layer and the cross-entropy in chunks, each
under activation checkpointing, so at most one chunk of logits (chunk x vocabulary, in
float32) exists at a time, forward or backward. With a 262k vocabulary, 4k trained
positions would otherwise hold 4 GB of logits.

Two input forms: a padded batch (``input_ids``, ``attention_mask``, ``loss_weights``) and
a packed row from ``batching.pack`` (``position_ids``, ``loss_index``, ``targets``,
``weights`` and the attention layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fewtune.train.packed_attention import PackedLayout

# configs with extra logit post-processing the selective path would have to copy
_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier_scale")
# what a batch of a vision-language model carries besides token ids (fewtune.vision.Vision.batch_inputs)
IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "mm_token_type_ids", "pixel_attention_mask")
# logits per chunk when no chunk size is given: 32M float32 values, about 128 MB
_CHUNK_ELEMENTS = 1 << 25


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def chunk_positions(vocab_size: int, chunk_size: int | None = None) -> int:
    return chunk_size or max(16, _CHUNK_ELEMENTS // max(vocab_size, 1))


class WeightedLMLoss(torch.nn.Module):
    """forward(...) -> (sum of weight * cross-entropy, sum of weights) over a batch."""

    def __init__(self, model, selective: bool = True, chunk_size: int | None = None, label_smoothing: float = 0.0):
        from fewtune.methods import is_prompt_learning, virtual_tokens

        super().__init__()
        self.model = model
        base = _base_model(model)
        config = base.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        # label smoothing applies to the training loss only; validation loss stays plain cross-entropy
        self.label_smoothing = label_smoothing
        # prompt-learning methods add their virtual tokens inside PeftModel.forward, so they take
        # the full forward; its logits start with one position per virtual token, dropped here
        self.virtual = virtual_tokens(model)
        self.selective = selective and not is_prompt_learning(model) and hasattr(base, "get_decoder") and not any(
            getattr(config, a, None) not in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS)
        # a vision-language model: the decoder input comes from its multimodal model (image features put in
        # at the image positions), not from the bare language model
        self.vision_language = getattr(config, "vision_config", None) is not None
        self.chunk = chunk_positions(base.get_output_embeddings().weight.shape[0] if self.selective else 0, chunk_size)

    @property
    def smoothing(self) -> float:
        return self.label_smoothing if self.training else 0.0

    def _chunk_loss(self, hidden, targets, weights):
        logits = _base_model(self.model).get_output_embeddings()(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        ce = F.cross_entropy(logits.float(), targets, reduction="none", label_smoothing=self.smoothing)
        return (ce * weights).sum()

    def weighted_ce(self, hidden, targets, weights) -> torch.Tensor:
        """Sum of weight * cross-entropy of the output layer applied to ``hidden`` (positions x dim)."""
        if hidden.shape[0] <= self.chunk:
            return self._chunk_loss(hidden, targets, weights)
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, hidden.shape[0], self.chunk):
            part = slice(s, s + self.chunk)
            total = total + checkpoint(self._chunk_loss, hidden[part], targets[part], weights[part], use_reentrant=False)
        return total

    def _decoder(self, **inputs):
        # use_cache=False: a training forward has no use for a KV cache (the config default builds one)
        base = _base_model(self.model)
        if self.vision_language:
            return base.model(use_cache=False, **inputs).last_hidden_state
        return base.get_decoder()(use_cache=False, **inputs).last_hidden_state

    def forward(self, input_ids, attention_mask=None, loss_weights=None, position_ids=None, loss_index=None,
                targets=None, weights=None, **layout):
        if loss_index is not None:
            return self._packed(input_ids, position_ids, loss_index, targets, weights, layout)
        targets = input_ids[:, 1:]
        weights = loss_weights[:, 1:].float()
        select = weights > 0
        w = weights[select]
        images = {k: layout.pop(k) for k in IMAGE_INPUTS if k in layout}  # a vision-language model's batch
        if self.selective:
            hidden = self._decoder(input_ids=input_ids, attention_mask=attention_mask, **images)[:, :-1][select]
            return self.weighted_ce(hidden, targets[select], w), w.sum()
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **images).logits
        logits = logits[:, self.virtual:][:, :-1][select]
        ce = F.cross_entropy(logits.float(), targets[select], reduction="none", label_smoothing=self.smoothing)
        return (ce * w).sum(), w.sum()

    def _packed(self, input_ids, position_ids, loss_index, targets, weights, layout):
        if not self.selective:
            raise ValueError("packed batches need the selective loss path (a decoder and a plain output layer)")
        # a 4D placeholder mask: transformers then builds no T x T mask of its own
        placeholder = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=input_ids.device)
        hidden = self._decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=placeholder,
                               fewtune_layout=PackedLayout.from_batch(layout))
        weights = weights.float()
        return self.weighted_ce(hidden[0, loss_index], targets, weights), weights.sum()
