"""Regularisers that run inside a training step: NEFTune, adversarial training (FGM, PGD) and EWC.

All act through one forward hook on the input embedding layer and one call in place of
the step's backward (:meth:`StepExtras.backward`), so the training loop stays as it is.

- NEFTune adds uniform noise of size alpha / sqrt(length * width) to the embeddings while
  training (never in evaluation or generation).
- FGM and PGD perturb the embedding layer's *output* in the direction that raises the loss
  (per example, L2 norm at most epsilon) and add the gradient of the perturbed loss. The
  embedding weights are never written to, so they are exactly as before after the step,
  and tied input/output embeddings are not disturbed.
- EWC adds weight / 2 * sum F * (theta - theta*)^2 to the loss: theta* are the weights at
  the start, F the diagonal Fisher information estimated on general data.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from fewtune.config import RegulariseSection

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
    from fewtune.train.loop import collate

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


class StepExtras:
    """What a training step does besides forward, backward and the optimizer step."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.reg: RegulariseSection = trainer.cfg.regularise
        adv = self.reg.adversarial.kind != "none"
        self.hook = None
        if adv or self.reg.neftune_alpha > 0:
            self.hook = EmbeddingHook(input_embeddings(trainer.model), self.reg.neftune_alpha, capture=adv)
        self.ewc = None
        if self.reg.ewc.weight > 0:
            self.ewc = EWC(trainer.model, self.reg.ewc.weight, self._fisher())
        self._penalised_step = None
        self.difficulty = self._difficulty()

    def _difficulty(self) -> list[float] | None:
        order, t = self.reg.curriculum.order, self.trainer
        if order == "none":
            return None
        if order == "length":
            return [float(n) for n in t.lengths]
        from fewtune.train.curriculum import base_losses

        log.info("curriculum: measuring the base model's loss on %d training examples", len(t.train_set.items))
        return base_losses(t.loss_module, t.train_set.items, t.tokenizer.pad_token_id, t.accelerator.device,
                           progress=t.main)

    def curriculum_batches(self, epoch: int) -> list[list[int]] | None:
        """The epoch's batches in easy-to-hard order, or None once the curriculum epochs are over."""
        if self.difficulty is None or epoch >= self.reg.curriculum.epochs:
            return None
        from fewtune.train.curriculum import curriculum_batches

        t = self.trainer
        return curriculum_batches(self.difficulty, self.reg.curriculum.buckets, t.cfg.train.batch_size,
                                  t.accelerator.num_processes, t.accelerator.process_index, t.cfg.train.seed, epoch)

    def _fisher(self) -> dict[str, torch.Tensor]:
        from fewtune.data.dataset import render_set
        from fewtune.data.formats import load_examples

        t, ewc = self.trainer, self.reg.ewc
        examples = load_examples(ewc.general)
        generator = torch.Generator().manual_seed(t.cfg.train.seed)
        picked = [examples[i] for i in torch.randperm(len(examples), generator=generator)[:ewc.samples].tolist()]
        rendered = render_set(picked, t.tokenizer, t.template, t.cfg.data.model_copy(update={"on_bad_example": "drop"}),
                              "EWC general")
        if not rendered.items:
            raise ValueError(f"regularise.ewc.general={ewc.general}: no usable example for the Fisher estimate")
        log.info("EWC: estimating the Fisher information on %d general examples", len(rendered.items))
        return estimate_fisher(t.loss_module, rendered.items, t.accelerator.device, t.tokenizer.pad_token_id,
                               progress=t.main)

    # ------------------------------------------------------------------ the step

    def _loss(self, batch, global_weight: float, delta: torch.Tensor) -> torch.Tensor:
        acc = self.trainer.accelerator
        self.hook.delta = delta
        try:
            with acc.autocast():
                loss_sum, _ = self.trainer.loss_module(**batch)
        finally:
            self.hook.delta = None
        return loss_sum / global_weight * acc.num_processes

    def adversarial(self, batch, global_weight: float) -> None:
        """After the clean backward: add the gradient of the loss at the adversarial embeddings."""
        adv = self.reg.adversarial
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
                (g,) = torch.autograd.grad(self._loss(batch, global_weight, delta), delta)
                delta = _project(delta.detach() + adv.alpha * _per_example_unit(g * mask), adv.epsilon)
        self.trainer.accelerator.backward(self._loss(batch, global_weight, delta.detach()))

    def backward(self, loss: torch.Tensor, batch, global_weight: float) -> None:
        """Replaces the step's ``accelerator.backward(loss)`` for one micro-batch."""
        step = self.trainer.state["step"]
        if self.ewc is not None and self._penalised_step != step:  # once per optimizer step
            self._penalised_step = step
            loss = loss + self.ewc.penalty()
        self.trainer.accelerator.backward(loss)
        if self.hook is not None and self.hook.capture:
            self.adversarial(batch, global_weight)

    def close(self) -> None:
        if self.hook is not None:
            self.hook.remove()
