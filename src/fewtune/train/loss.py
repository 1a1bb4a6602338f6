"""Weighted next-token loss that computes the output layer only where loss is taken.

The vocabulary projection is a large share of a small model's compute (SmolLM2-135M:
28M of 135M parameters; Qwen's 152k vocabulary makes it larger still). Positions whose
target has zero loss weight (the prompt, padding) need no logits at all, so the decoder
runs on the whole row and the output layer only on the selected positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# configs with extra logit post-processing the selective path would have to copy
_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier_scale")


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class WeightedLMLoss(torch.nn.Module):
    """forward(...) -> (sum of weight * cross-entropy, sum of weights) over a batch."""

    def __init__(self, model, selective: bool = True, label_smoothing: float = 0.0):
        from fewtune.train.adapters import is_prompt_learning, virtual_tokens

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

    def _selected_logits(self, input_ids, attention_mask, select):
        base = _base_model(self.model)
        hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = base.get_output_embeddings()(hidden[:, :-1][select])
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def forward(self, input_ids, attention_mask, loss_weights):
        targets = input_ids[:, 1:]
        weights = loss_weights[:, 1:].float()
        select = weights > 0
        if self.selective:
            logits = self._selected_logits(input_ids, attention_mask, select)
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            logits = logits[:, self.virtual:][:, :-1][select]
        smoothing = self.label_smoothing if self.training else 0.0
        ce = F.cross_entropy(logits.float(), targets[select], reduction="none", label_smoothing=smoothing)
        w = weights[select]
        return (ce * w).sum(), w.sum()
