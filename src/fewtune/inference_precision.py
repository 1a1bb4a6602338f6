"""The precision that eval, compare, generate, chat, pseudo-label and model-based augmentation run in.

``auto`` follows training, so that what ``eval`` prints comes from the arithmetic the run was
trained and validated in:

- a run directory runs in the precision it trained in (the last ``start`` record of its
  metrics.jsonl says which), except bf16 on a CPU where bf16 is far slower than fp32 (an
  AVX2-only machine evaluating a run trained on an AMX one): fp32 there, and the log says so;
- any other model (a base model, a merged export) gets what training would choose for it
  here: on a GPU bf16 where supported; on a CPU bf16 only if timed forward passes of this model
  run at least ``fewtune.precision.MIN_SPEEDUP`` faster in bf16 (measured once per machine and
  model, cached with training's decisions in ``$FEWTUNE_CACHE/precision.json``).

``FEWTUNE_MIXED_PRECISION=no|bf16`` forces ``auto`` here as it does for training. bf16 means
the weights themselves are cast to bfloat16 once after loading (and after a LoRA merge, which
is done in float32), so no matrix is re-cast on every call; a model loaded with an explicit
``model.dtype`` is left as it is. Exports never go through this: they stay float32.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fewtune import precision

log = logging.getLogger(__name__)

SETTINGS = ("auto", "no", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
PROBE_SHAPE = (8, 64)  # rows x tokens of the timed forward passes (a batch of short prompts)
PROBE_REPEATS = 3  # timed forward passes per precision, after one warm-up; the median counts


@dataclass
class Choice:
    precision: str  # "no" (float32), "bf16" or (GPU only) "fp16"
    reason: str

    @property
    def name(self) -> str:
        return "fp32" if self.precision == "no" else self.precision


def trained_precision(run_dir: str | Path) -> str | None:
    """The mixed precision the run's last training session used ('no', 'bf16', 'fp16'), or None if unknown."""
    found = None
    try:
        with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
            for line in f:
                if '"start"' not in line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("event") == "start" and record.get("mixed_precision"):
                    found = record["mixed_precision"]
    except OSError:
        return None
    return found


def _time_forward(model, precision: str) -> float:
    """Median seconds of a no-grad forward pass of PROBE_SHAPE tokens (vocabulary projection at the last one)."""
    rows, width = PROBE_SHAPE
    vocab = int(getattr(model.config, "vocab_size", 1000) or 1000)
    ids = (torch.arange(rows * width).reshape(rows, width) * 7919 + 13) % vocab
    ids = ids.to(next(model.parameters()).device)
    times = []
    with torch.no_grad():
        for _ in range(PROBE_REPEATS + 1):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _measure_cpu(model, name: str) -> tuple[Choice, torch.nn.Module | None]:
    """bf16 or fp32 for ``model`` on this CPU by timed forward passes (cached per machine and model); the bf16
    copy made for the timing comes back when bf16 wins, so it need not be made again."""
    key = "inference|" + precision.cache_key(name, "inference", PROBE_SHAPE[0], False, False, False)
    bf16_copy: list = []

    def time_pass(precision: str) -> float:
        if precision == "no":
            return _time_forward(model, "no")
        bf16_copy.append(copy.deepcopy(model).to(torch.bfloat16))
        return _time_forward(bf16_copy[-1], "bf16")

    decision = precision.decide(time_pass, key, timed="a forward pass of 8x64 tokens")
    return Choice(decision.chosen, decision.describe()), (bf16_copy[-1] if bf16_copy else None)


def resolve(setting: str, model, name: str, run_dir: str | Path | None = None) -> tuple[Choice, torch.nn.Module]:
    """The precision for inference with ``model`` (loaded in float32) and the model to use: ``model`` itself,
    or it cast to bf16. ``name`` identifies the model in the timing cache; ``run_dir`` is the run it came from."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown precision '{setting}': use one of {', '.join(SETTINGS)}")
    loaded_dtype = next(model.parameters()).dtype
    if loaded_dtype != torch.float32:  # an explicit model.dtype: left as the user loaded it
        return Choice(DTYPE_NAMES.get(loaded_dtype, str(loaded_dtype)),
                      f"the model was loaded in {loaded_dtype} (model.dtype)"), model
    cpu = next(model.parameters()).device.type == "cpu"
    bf16_copy = None
    if setting == "fp16" and cpu:
        raise ValueError("fp16 inference needs a GPU; on a CPU use bf16 or no")
    if setting != "auto":
        choice = Choice(setting, f"asked for {'fp32' if setting == 'no' else setting}")
    elif (forced := precision.forced_precision()) is not None:
        choice = Choice("bf16" if forced == "fp16" and cpu else forced, f"{precision.PRECISION_ENV} is set")
    elif run_dir is not None and (trained := trained_precision(run_dir)) is not None:
        choice = Choice("bf16" if trained == "fp16" and cpu else trained,
                        f"the run trained in {'fp32' if trained == 'no' else trained}")
        if choice.precision == "bf16" and cpu:
            if (linear := precision.cpu_bf16_speedup()) < precision.LINEAR_FLOOR:
                choice = Choice("no", f"the run trained in bf16, but bf16 runs at {linear:.2f}x the fp32 speed on "
                                      "this CPU: fp32 here")
    elif not cpu:
        choice = Choice("bf16" if torch.cuda.is_bf16_supported() else "no", "this GPU's bf16 support")
    else:
        choice, bf16_copy = _measure_cpu(model, name)
    if choice.precision != "no":
        model = bf16_copy if bf16_copy is not None else model.to(DTYPES[choice.precision])
    log.info("inference in %s (%s); FEWTUNE_MIXED_PRECISION=no|bf16 chooses otherwise", choice.name, choice.reason)
    return choice, model

