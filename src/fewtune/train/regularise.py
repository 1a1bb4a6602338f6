"""Regularisers, each attached to the training loop at a named point and given only what it needs.

| point | regulariser | what the loop does there |
|---|---|---|
| embedding hook | NEFTune, FGM/PGD | a forward hook on the input embedding layer (installed once) |
| loss penalty | EWC | ``penalty(step)`` is added to the first micro-batch's loss of each step |
| after backward | FGM/PGD | ``after_backward(batch, scale)`` adds the gradient at the perturbed embeddings |

- NEFTune adds uniform noise of size alpha / sqrt(length * width) to the embeddings while
  training (never in evaluation or generation).
- FGM and PGD perturb the embedding layer's *output* in the direction that raises the loss
  (per example, L2 norm at most epsilon) and add the gradient of the perturbed loss. The
  embedding weights are never written to, so they are exactly as before after the step,
  and tied input/output embeddings are not disturbed.
- EWC adds weight / 2 * sum F * (theta - theta*)^2 to the loss: theta* are the weights at
  the start, F the diagonal Fisher information estimated on general data.

(What shapes the training data is not here: replay is ``fewtune.data.replay``, the curriculum's batch order
``fewtune.train.curriculum``; both are set under ``data``. Label smoothing is the loss module's.)
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from fewtune.config import AdversarialSection, DataSection, RegulariseSection
from fewtune.train.batching import collate

log = logging.getLogger(__name__)


def input_embeddings(model) -> torch.nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_input_embeddings()


def neftune_noise(embeds: torch.Tensor, alpha: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """NEFTune noise for a (batch, length, width) tensor: uniform in +-alpha / sqrt(length * width)."""
    scale = alpha / (embeds.shape[1] * embeds.shape[2]) ** 0.5
    noise = torch.rand(embeds.shape, generator=generator, device="cpu" if generator else embeds.device)
    return ((noise.to(embeds.device, embeds.dtype) * 2 - 1) * scale)


def _per_example_unit(g: torch.Tensor) -> torch.Tensor:
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
    return g / norm


def _project(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    norm = delta.flatten(1).norm(dim=1).view(-1, *([1] * (delta.dim() - 1)))
    return delta * torch.clamp(epsilon / norm.clamp_min(1e-12), max=1.0)


class EmbeddingHook:
    """Adds NEFTune noise, captures the output's gradient, or adds an adversarial perturbation."""

    def __init__(self, module: torch.nn.Module, neftune_alpha: float, capture: bool):
        self.neftune_alpha, self.capture = neftune_alpha, capture
        self.delta: torch.Tensor | None = None
        self.captured: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        if not module.training:
            return None
        if self.neftune_alpha > 0:
            output = output + neftune_noise(output, self.neftune_alpha)
        if self.delta is not None:
            return output + self.delta.to(output.dtype)
        if self.capture:
            if output.requires_grad:
                output.retain_grad()
            else:  # frozen embeddings (adapters): make the output a leaf whose gradient we read
                output = output.detach().requires_grad_(True)
            self.captured = output
        return output

    def remove(self) -> None:
        self.handle.remove()


class EWC:
    """Elastic weight consolidation against forgetting the general data."""

    def __init__(self, model, weight: float, fisher: dict[str, torch.Tensor]):
        self.weight = weight
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}
        self.fisher = fisher

    def penalty(self) -> torch.Tensor:
        total = sum((self.fisher[n] * (p - self.anchor[n]) ** 2).sum() for n, p in self.params.items())
        return 0.5 * self.weight * total


def estimate_fisher(loss_module, items, device, pad_id: int, progress: bool = True) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information: the mean squared gradient of each example's mean token loss."""
    model = loss_module.model
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = loss_module.training
    loss_module.eval()  # no dropout: the gradient of the model as it is
    for item in tqdm(items, desc="EWC Fisher", disable=not progress or len(items) < 2, dynamic_ncols=True):
        batch = {k: v.to(device) for k, v in collate([item], pad_id).items()}
        loss_sum, weight = loss_module(**batch)
        grads = torch.autograd.grad(loss_sum / weight, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                fisher[n] += g.detach().float() ** 2
    loss_module.train(was_training)
    return {n: f / max(len(items), 1) for n, f in fisher.items()}


class Adversarial:
    """FGM (one step) or PGD (K projected steps) on the embedding layer's output, after the clean backward.

    ``loss`` computes a micro-batch's scaled loss (the hook adds ``delta`` inside it); ``backward`` is the
    accelerator's.
    """

    def __init__(self, settings: AdversarialSection, hook: EmbeddingHook, loss, backward):
        self.settings, self.hook, self.loss, self.backward = settings, hook, loss, backward

    def _loss_at(self, batch, delta: torch.Tensor) -> torch.Tensor:
        self.hook.delta = delta
        try:
            return self.loss(batch)
        finally:
            self.hook.delta = None

    def after_backward(self, batch) -> None:
        adv = self.settings
        captured = self.hook.captured
        self.hook.captured = None
        if captured is None or captured.grad is None:
            raise RuntimeError("adversarial training found no gradient at the embedding output")
        if "attention_mask" in batch:
            mask = batch["attention_mask"].unsqueeze(-1).to(captured.dtype)
        else:  # a packed row has no padding: every position is a real token
            # (the epsilon ball is then per packed row rather than per example)
            mask = torch.ones(captured.shape[:-1] + (1,), dtype=captured.dtype, device=captured.device)
        grad = captured.grad.detach() * mask
        if adv.kind == "fgm":
            delta = adv.epsilon * _per_example_unit(grad)
        else:
            delta = _project(adv.alpha * _per_example_unit(grad), adv.epsilon)
            for _ in range(adv.steps - 1):
                delta = delta.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self._loss_at(batch, delta), delta)
                delta = _project(delta.detach() + adv.alpha * _per_example_unit(g * mask), adv.epsilon)
        self.backward(self._loss_at(batch, delta.detach()))


class Regularisers:
    """The regularisers of one run, at their named points; each point is a no-op when nothing uses it."""

    def __init__(self, hook: EmbeddingHook | None = None, adversarial: Adversarial | None = None,
                 ewc: EWC | None = None):
        self.hook, self.adversarial, self.ewc = hook, adversarial, ewc
        self._penalised_step: int | None = None

    def penalty(self, step: int) -> torch.Tensor | None:
        """EWC's penalty, once per optimizer step (the first micro-batch of ``step`` gets it)."""
        if self.ewc is None or self._penalised_step == step:
            return None
        self._penalised_step = step
        return self.ewc.penalty()

    def after_backward(self, batch) -> None:
        if self.adversarial is not None:
            self.adversarial.after_backward(batch)

    def close(self) -> None:
        """Take the embedding hook off the model (NEFTune and adversarial leave no trace after training)."""
        if self.hook is not None:
            self.hook.remove()


def general_items(ewc, tokenizer, template, data: DataSection, seed: int) -> list:
    """``ewc.samples`` seeded examples of the general data, rendered as training renders."""
    from fewtune.data.dataset import render_set
    from fewtune.data.formats import load_examples

    examples = load_examples(ewc.general)
    generator = torch.Generator().manual_seed(seed)
    picked = [examples[i] for i in torch.randperm(len(examples), generator=generator)[:ewc.samples].tolist()]
    rendered = render_set(picked, tokenizer, template, data.model_copy(update={"on_bad_example": "drop"}), "EWC general")
    if not rendered.items:
        raise ValueError(f"regularise.ewc.general={ewc.general}: no usable example for the Fisher estimate")
    return rendered.items


def build_regularisers(reg: RegulariseSection, *, model, loss_module, accelerator, tokenizer, template,
                       data: DataSection, seed: int, step_loss, progress: bool) -> Regularisers:
    """The run's regularisers. ``step_loss(batch)`` is the scaled micro-batch loss the step backpropagates."""
    adv_on = reg.adversarial.kind != "none"
    hook = EmbeddingHook(input_embeddings(model), reg.neftune_alpha, capture=adv_on) \
        if adv_on or reg.neftune_alpha > 0 else None
    adversarial = Adversarial(reg.adversarial, hook, step_loss, accelerator.backward) if adv_on else None
    ewc = None
    if reg.ewc.weight > 0:
        items = general_items(reg.ewc, tokenizer, template, data, seed)
        log.info("EWC: estimating the Fisher information on %d general examples", len(items))
        ewc = EWC(model, reg.ewc.weight, estimate_fisher(loss_module, items, accelerator.device,
                                                         tokenizer.pad_token_id, progress=progress))
    return Regularisers(hook, adversarial, ewc)
