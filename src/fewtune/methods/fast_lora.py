"""A shorter LoRA training step on CPU: fewer passes over the activations per adapted layer.

peft computes each adapted linear layer as ``base(x) + B(A(dropout(x))) * scaling``. On a CPU
every term of that is a full pass over a (tokens x width) tensor, forward and backward: the
dropout's mask multiply and scale, the ``* scaling`` and the ``+``. With LoRA on all seven
linear layers of a decoder block these elementwise passes, not the matrix products, were the
largest item left in the profile of a bf16 step (benchmarks/results/train_speed.md).

In training mode on a CPU, :func:`use_fast_lora_forward` gives each vanilla LoRA layer a
forward that computes the same function with fewer passes:

- the dropout only zeroes (one pass; its ``1/(1-p)`` and ``scaling`` multiply the rank-r
  product, which has r columns instead of the layer's width);
- ``B``'s product is added onto the base output by one ``addmm``, not a product, a scale and
  an add;
- layers that read the same tensor (q, k and v read the attention input; gate and up the MLP
  input) share one dropout mask and one dropped copy. That is what LoRA does on models whose
  q/k/v or gate/up projections are one fused linear layer (Phi-3's ``qkv_proj``,
  ``gate_up_proj``): one mask per input. Each adapter still sees every element dropped with
  probability p, independently of the other elements.

Evaluation, generation, merging, DoRA and other variants, several active adapters, LoRA on
embeddings and GPU training keep peft's own forward.
"""

from __future__ import annotations

import weakref

import torch

from fewtune.methods.fast_dropout import FastDropout, keep_multiplier


class SharedDrop:
    """The last dropped input of a model's LoRA layers, reused while the same tensor comes in again.

    Holds only weak references: the dropped copy lives as long as the autograd graph keeps it."""

    def __init__(self):
        self.source = self.dropped = None  # weak references
        self.version, self.p, self.scale = -1, None, 1.0

    def __call__(self, x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
        dropped = self.dropped() if self.dropped is not None else None
        if dropped is not None and self.source() is x and self.version == x._version and self.p == p:
            return dropped, self.scale
        keep, keep_prob = keep_multiplier(x.shape, p, x.dtype, device=x.device)
        if keep_prob >= 1.0:
            return x, 1.0
        dropped, scale = x * keep, 1.0 / keep_prob  # autograd saves the 0/1 multiplier for the backward
        self.source, self.dropped = weakref.ref(x), weakref.ref(dropped)
        self.version, self.p, self.scale = x._version, p, scale
        return dropped, scale


def _fast_path(layer, x: torch.Tensor, args: tuple, kwargs: dict):
    """The adapter to use in the short forward, or None when peft's own forward must run."""
    if not (layer.training and torch.is_grad_enabled()) or x.device.type != "cpu" or args:
        return None
    if kwargs and any(v is not None for v in kwargs.values()):
        return None
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if layer.lora_B[name].bias is not None or not isinstance(layer.base_layer, torch.nn.Linear):
        return None
    if x.dtype != layer.lora_A[name].weight.dtype and not torch.is_autocast_enabled("cpu"):
        return None  # peft casts the input to the adapter's dtype; keep its path for that
    return name


def _lora_linear_class():
    from peft.tuners.lora.layer import Linear as LoraLinear

    class FastLoraLinear(LoraLinear):
        """peft's LoRA ``Linear`` with the short CPU training forward (module docstring); peft's otherwise."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            name = _fast_path(self, x, args, kwargs)
            if name is None:
                return super().forward(x, *args, **kwargs)
            result = self.base_layer(x)
            dropout = self.lora_dropout[name]
            scale = self.scaling[name]
            shared = getattr(self, "_fewtune_shared_drop", None)
            if isinstance(dropout, FastDropout) and dropout.p > 0.0 and shared is not None:
                dropped, keep_scale = shared(x, dropout.p)
                scale = scale * keep_scale
            else:
                dropped = dropout(x)  # nn.Identity (p = 0) or a module this path does not know
            low = self.lora_A[name](dropped) * scale  # r columns: the cheap place to scale
            flat = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]),
                               self.lora_B[name].weight.t())
            return flat.view(result.shape).to(result.dtype)

    FastLoraLinear.__name__ = FastLoraLinear.__qualname__ = "Linear"  # printed models read as peft's
    return LoraLinear, FastLoraLinear


_CLASSES = None


def use_fast_lora_forward(model) -> int:
    """Give each peft LoRA ``Linear`` of ``model`` the short training forward above; returns how many."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _lora_linear_class()
    plain, fast = _CLASSES
    shared = SharedDrop()
    changed = 0
    for module in model.modules():
        if type(module) is plain:
            module.__class__ = fast
            module._fewtune_shared_drop = shared
            changed += 1
    return changed
