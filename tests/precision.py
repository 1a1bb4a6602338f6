"""Which precision an equivalence test proves its property in, and the tolerance that follows from it.

Every equivalence test (gradient accumulation, packing, data parallelism) runs twice, with the
precision pinned, so both variants run on every machine whatever ``auto`` would pick there:

- ``no`` (float32): the two arrangements compute the same sums in another order, so they agree to
  float32 rounding; the test compares losses, gradients and the weights after the optimizer step.
- ``bf16`` (autocast): each matrix product's output is rounded to bfloat16, whose unit roundoff is
  ``BF16_U = 2**-8`` (8 significant bits). Two arrangements that add the same terms in another order
  can round each such output differently, by at most one rounding each: 2u relative. A LoRA gradient
  goes through two rounded products on its way (the forward activation and the backward product),
  so the gradients of the two arrangements agree within ``GRAD_RTOL_BF16 = 4u`` norm-wise per tensor.
  The loss is a float32 mean of many per-token terms, each off by at most about u, so it agrees
  within ``LOSS_RTOL_BF16 = u``.
  Weights after an AdamW step are not compared element by element in bf16: Adam divides each
  element's step by that element's own gradient size, so an element whose gradient is near zero
  moves by up to ±lr on a rounding difference, and no bound in units of u exists for it.
"""

from __future__ import annotations

import pytest
import torch

BF16_U = 2.0 ** -8
FP32_EPS = 2.0 ** -23
LOSS_RTOL_BF16 = BF16_U
GRAD_RTOL_BF16 = 4 * BF16_U

PRECISIONS = pytest.mark.parametrize("precision", ["no", "bf16"])


def loss_rtol(precision: str) -> float:
    return 1e-5 if precision == "no" else LOSS_RTOL_BF16


def capture_gradients(trainer) -> list[dict[str, torch.Tensor]]:
    """The trainable gradients at every optimizer step of ``trainer.fit()`` (after clipping), in order."""
    seen: list[dict[str, torch.Tensor]] = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
                     if p.requires_grad and p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return seen


def assert_gradients_match(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], precision: str) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        if precision == "no":
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
        else:
            assert_normwise_close(a[name], b[name], GRAD_RTOL_BF16, f"{name} (bf16, allowed 4u)")


def assert_normwise_close(a: torch.Tensor, b: torch.Tensor, rtol: float, name: str = "") -> None:
    """‖a - b‖ <= rtol ‖a‖: the comparison rounding errors allow; element by element, a value near zero
    can differ by many times its own size while the tensor agrees to the last bits that matter."""
    scale, difference = a.norm(), (a - b).norm()
    assert difference <= rtol * scale, f"{name}: differs by {difference / scale:.2e} of its norm; allowed {rtol:.2e}"
