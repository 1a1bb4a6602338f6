"""Training throughput: fewtune's loop against a plain transformers.Trainer, same model, data, LoRA.

    python benchmarks/train_speed.py                    # SNIPS prompts, SmolLM2-135M, LoRA r=8
    python benchmarks/train_speed.py --steps 5 --arms baseline,fewtune   # quicker
    python benchmarks/train_speed.py --config my.yaml   # your model/data/method instead of SNIPS

The SNIPS workload's recipe is benchmarks/configs/train_speed.yaml. The results go to --out
(default benchmarks/results/train_speed.md); text under the NOTES marker there is written by
hand and kept when the results are rewritten.

Every arm trains the same model on the same token ids (rendered once by fewtune's render
function) with the same LoRA configuration and batch size, for ``--warmup`` + ``--steps``
optimizer steps; only the timed steps count. Each arm runs in its own child process so
its peak memory is its own (peak RSS on CPU, peak allocated on GPU).

- baseline: ``transformers.Trainer``, default precision, ``DataCollatorForSeq2Seq`` padding.
- padded:   fewtune, packing off (length-grouped padded batches, logits only where trained).
- packed:   fewtune, packed rows without padding, no prefix sharing.
- fewtune:  fewtune defaults (packing, shared prompt prefix computed once, auto precision).
- fewtune-fp32, fewtune-bf16: the same with the precision pinned, so the report can say whether auto's
  choice was the faster one (a warning when it was not).

tokens/s counts the real tokens of the examples trained on (no padding; a prompt prefix
computed once still counts once per example, as the baseline computes it). MFU is model
FLOPs per second (the FLOPs a plain forward+backward of those tokens takes, the same
count for every arm) over the machine's measured matrix-multiply peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fewtune.data.formats import DataError
from fewtune.datasets.common import DatasetNotFound
from fewtune.datasets.snips import SYSTEM_PROMPT, find_snips, snips_records  # the one SNIPS reader and prompt

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "benchmarks" / "configs" / "train_speed.yaml"
NOTES = "<!-- written by hand below this line; train_speed.py keeps it when it rewrites the results -->"
PROFILE_STEPS = 2  # with --profile: extra steps after the timed ones, run under torch.profiler
PROFILE_TABLE_ENV = "FEWTUNE_PROFILE_TABLE"  # with --profile: print N operators by input shape (N:name: by name)
CATEGORIES = (  # (label, substrings of aten op names), for the "where the time goes" line
    ("matrix multiplies", ("aten::mm", "aten::addmm", "aten::bmm")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("cross-entropy", ("log_softmax", "nll_loss")),
    ("optimizer", ("adam", "_foreach")),
    ("gather/scatter", ("aten::index", "index_put", "index_select", "gather", "scatter")),
)
ARMS = {
    "baseline": "transformers.Trainer, default precision, DataCollatorForSeq2Seq padding",
    "padded": "fewtune, packing off: length-grouped padded batches",
    "packed": "fewtune, packed rows, no prefix sharing",
    "fewtune": "fewtune defaults: packed rows + shared prompt prefix, mixed_precision auto",
    "fewtune-fp32": "fewtune defaults, mixed_precision no (fp32)",
    "fewtune-bf16": "fewtune defaults, mixed_precision bf16",
}
PINNED = {"fewtune-fp32": "no", "fewtune-bf16": "bf16"}


# ------------------------------------------------------------------ data and configuration

def snips_rows(snips_dir: Path | None, limit: int | None) -> list[dict]:
    try:
        records = snips_records(snips_dir or find_snips(), "intent", "train")  # a given folder needs train files only
    except DatasetNotFound as err:
        sys.exit(str(err))
    except DataError as err:
        sys.exit(f"SNIPS data not read: {err} (expected the train_<Intent>.json files of "
                 "snipsco/nlu-benchmark; pass --snips DIR)")
    rows = [{"text": r["text"], "label": r["label"]} for r in records]
    if limit:  # an even spread over the intents, not the first intent only
        rows = rows[::max(1, len(rows) // limit)][:limit]
    return rows


def make_config(args, data_path: str | None, arm: str, run_dir: str):
    from fewtune.config import build_config, load_config

    total = args.warmup + args.steps + (PROFILE_STEPS if args.profile else 0)
    overrides = [f"train.max_steps={total}", f"train.output_dir={run_dir}", "eval.every=null",
                 "train.save_every=null", "data.val_ratio=0", "data.validation=null", "train.log_every=1",
                 f"train.batch_size={args.batch_size}", "eval.early_stopping.enabled=false"]
    if arm == "padded":
        overrides.append("train.packing=false")
    if arm == "packed":
        overrides.append("train.share_prefix=false")
    if arm in PINNED:
        overrides.append(f"train.mixed_precision={PINNED[arm]}")
    elif args.mixed_precision:
        overrides.append(f"train.mixed_precision={args.mixed_precision}")
    if args.config:
        return load_config(args.config, overrides)
    base = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    # values, not dotted overrides: a path or the system prompt ("...intents: A, B...") would parse as YAML
    base["model"]["name"] = args.model
    base["data"].update(train=data_path, system_prompt=SYSTEM_PROMPT)
    return build_config(base, overrides, source=str(RECIPE))


# ------------------------------------------------------------------ measurements

def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_memory(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return peak_rss_bytes()


def matmul_peak_flops(device: str, size: int = 1024, reps: int = 10) -> dict[str, float]:
    """Best achieved FLOP/s of a square matrix product, fp32 (and bf16 where it is fast)."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        start = time.perf_counter()
        torch.mm(a, b)
        # a CPU without bf16 instructions takes seconds per product: two tries there; elsewhere `reps`, since the
        # first few bf16 products on an AMX machine run at half speed or less (470 against 1,143 GFLOP/s seen)
        slow = device != "cuda" and time.perf_counter() - start > 0.1
        best = float("inf")
        for _ in range(2 if slow else reps):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            torch.mm(a, b)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        out[name] = 2 * size ** 3 / best
    return out


def model_flops_per_token(config, mean_len: float, lora_params: int) -> float:
    """FLOPs of a plain forward + backward (input gradients only: the base is frozen) per token."""
    d, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    linear = layers * (d * heads * head_dim + 2 * d * kv + heads * head_dim * d + 3 * d * config.intermediate_size)
    linear += config.vocab_size * d  # the output layer, at every position in a plain forward
    attention = layers * 2 * 2 * heads * head_dim * (mean_len + 1) / 2  # QK^T and AV over the causal context
    forward = 2 * linear + attention
    return 2 * forward + 6 * lora_params


def machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
        bf16 = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx_vnni") if f in flags.split()]
    except (OSError, StopIteration):
        bf16 = []
    info = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "cpu_bf16_flags": bf16 or ["none"],
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version()}
    import transformers, peft, accelerate

    info.update(transformers=transformers.__version__, peft=peft.__version__, accelerate=accelerate.__version__)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ------------------------------------------------------------------ the arms (child processes)

class FlopCount:
    """FLOPs the first (untimed) step executes, counted by torch.utils.flop_counter."""

    def __init__(self):
        self.mode, self.flops = None, None

    def begin(self, step: int) -> None:
        if step == 0:
            from torch.utils.flop_counter import FlopCounterMode

            self.mode = FlopCounterMode(display=False)
            self.mode.__enter__()

    def end(self, step: int) -> None:
        if self.mode is not None and step == 0:
            self.mode.__exit__(None, None, None)
            self.flops = self.mode.get_total_flops()
            self.mode = None


class StepProfiler:
    """Runs torch.profiler over the steps after the timed ones; summarises where the time went."""

    def __init__(self, enabled: bool, first: int):
        self.enabled, self.first, self.profiler, self.summary = enabled, first, None, None

    def begin(self, step: int) -> None:
        if self.enabled and step == self.first:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=bool(os.environ.get(PROFILE_TABLE_ENV)))
            self.profiler.__enter__()

    def end(self, step: int) -> None:
        if self.profiler is not None and step == self.first + PROFILE_STEPS - 1:
            self.profiler.__exit__(None, None, None)
            events = self.profiler.key_averages()
            rows, _, by = (os.environ.get(PROFILE_TABLE_ENV) or "0").partition(":")
            if int(rows):  # the operators by input shape (N:name: by name only), a closer look than the shares
                print(self.profiler.key_averages(group_by_input_shape=by != "name").table(
                    sort_by="self_cpu_time_total", row_limit=int(rows), max_name_column_width=60,
                    max_shapes_column_width=70), file=sys.stderr, flush=True)
            total = sum(e.self_cpu_time_total for e in events)
            shares = {}
            for e in events:
                label = next((lab for lab, keys in CATEGORIES if any(k in e.key.lower() for k in keys)), "other ops")
                shares[label] = shares.get(label, 0) + e.self_cpu_time_total
            top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
            self.summary = {"shares": {k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
                            "top": [(e.key, e.self_cpu_time_total / total, e.count) for e in top],
                            "total_s": total / 1e6 / PROFILE_STEPS}
            self.profiler = None


def run_fewtune(args, spec: dict) -> dict:
    import torch

    from fewtune.train.loop import Trainer

    cfg = make_config(args, spec["data"], spec["arm"], spec["run_dir"])
    trainer = Trainer(cfg)
    marks: list[tuple[float, int]] = []  # (time after the step, peak memory so far)
    device = trainer.accelerator.device.type
    timed = args.warmup + args.steps
    profiler = StepProfiler(args.profile, timed)
    counter = FlopCount()

    class TimeSteps:
        """The loop's public step callbacks: profile, count FLOPs and time each optimizer step."""

        def __init__(self):
            self.step = 0

        def on_step_begin(self, trainer):
            profiler.begin(self.step)
            counter.begin(self.step)

        def on_step_end(self, trainer):
            if device == "cuda":
                torch.cuda.synchronize()
            counter.end(self.step)
            profiler.end(self.step)
            if self.step < timed:
                marks.append((time.perf_counter(), peak_memory(device)))
            self.step += 1

    trainer.callbacks.append(TimeSteps())
    trainer.fit()
    records = [json.loads(l) for l in (Path(spec["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    tokens = [r["tokens"] for r in records if "train_loss" in r][:len(marks)]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    return {"times": [t for t, _ in marks], "tokens": tokens, "losses": losses, "peak_memory": marks[-1][1],
            "profile": profiler.summary, "step0_flops": counter.flops,
            "device": device, "precision": trainer.accelerator.mixed_precision, "packing": trainer.packing,
            "threads": torch.get_num_threads(), "lora_params": trainer.trainable,
            "precision_choice": trainer.precision_decision.describe() if trainer.precision_decision else None,
            "precision_setting": trainer.cfg.train.mixed_precision}


def run_baseline(args, spec: dict) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from fewtune.data.dataset import load_train_val, render_set
    from fewtune.data.render import Template
    from fewtune.models import load_model, load_tokenizer
    from fewtune.methods.lora import lora_config
    from fewtune.methods import apply_method

    cfg = make_config(args, spec["data"], "baseline", spec["run_dir"])
    tokenizer = load_tokenizer(cfg.model.name)
    template = Template.from_config(tokenizer, cfg)
    examples, _ = load_train_val(cfg.data)
    rendered = render_set(examples, tokenizer, template, cfg.data, "training").items
    rows = [{"input_ids": r.input_ids, "attention_mask": [1] * len(r),
             "labels": [t if w > 0 else -100 for t, w in zip(r.input_ids, r.loss_weights)]} for r in rendered]
    model = load_model(cfg.model.name, cfg.model.dtype)
    if cfg.method.name == "lora":
        # plain peft, as a user of transformers.Trainer has it (its own nn.Dropout, not fewtune's)
        model = get_peft_model(model, lora_config(cfg.method))
    else:
        model = apply_method(model, cfg.method)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    batch_tokens: list[int] = []

    def counting_collator(features):
        batch = collator(features)
        batch_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    marks: list[tuple[float, int]] = []
    losses: list[float] = []
    device = "cuda" if torch.cuda.is_available() else "cpu"

    timed = args.warmup + args.steps
    profiler = StepProfiler(args.profile, timed)
    counter = FlopCount()

    class Timer(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kw):
            profiler.begin(state.global_step)
            counter.begin(state.global_step)

        def on_step_end(self, targs, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            step = state.global_step - 1  # already counted when this runs
            counter.end(step)
            profiler.end(step)
            if step < timed:
                marks.append((time.perf_counter(), peak_memory(device)))

    targs = TrainingArguments(output_dir=spec["run_dir"], per_device_train_batch_size=cfg.train.batch_size,
                              max_steps=timed + (PROFILE_STEPS if args.profile else 0), learning_rate=cfg.train.resolved_lr("lora"),
                              weight_decay=cfg.train.weight_decay, lr_scheduler_type="cosine", logging_steps=1,
                              save_strategy="no", report_to=[], seed=cfg.train.seed, dataloader_num_workers=0,
                              disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=counting_collator,
                      callbacks=[Timer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"times": [t for t, _ in marks], "tokens": batch_tokens[:len(marks)], "losses": losses,
            "peak_memory": marks[-1][1], "device": device, "precision": "fp32 (default)", "packing": False,
            "profile": profiler.summary, "step0_flops": counter.flops,
            "threads": torch.get_num_threads(), "lora_params": trainable}


def worker(args) -> None:
    spec = json.loads(Path(args.worker).read_text())
    result = run_baseline(args, spec) if spec["arm"] == "baseline" else run_fewtune(args, spec)
    Path(spec["result"]).write_text(json.dumps(result))


# ------------------------------------------------------------------ the parent: run arms, report

def summarise(result: dict, warmup: int) -> dict:
    times, tokens = result["times"], result["tokens"]
    if len(times) <= warmup:
        raise RuntimeError(f"only {len(times)} steps ran; need more than --warmup={warmup}")
    span = times[-1] - times[warmup - 1] if warmup else times[-1] - times[0]
    timed_tokens = sum(tokens[warmup:]) if warmup else sum(tokens[1:])
    steps = len(times) - max(warmup, 1)
    return {"tokens_per_s": timed_tokens / span, "s_per_step": span / steps, "steps": steps}


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per arm")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=None, help="use this many SNIPS examples (default: all)")
    parser.add_argument("--arms", default="baseline,padded,packed,fewtune,fewtune-fp32,fewtune-bf16",
                        help=f"from {', '.join(ARMS)}")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--mixed-precision", default=None, help="fewtune arms: train.mixed_precision (default auto)")
    parser.add_argument("--config", default=None, help="a fewtune YAML config to benchmark instead of SNIPS")
    parser.add_argument("--snips", type=Path, default=None,
                        help="the SNIPS folder (default: $FEWTUNE_SHARED_DATA/snips, else ../shared/data/snips)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_speed.md")
    parser.add_argument("--profile", action="store_true",
                        help=f"profile {PROFILE_STEPS} more steps per arm with torch.profiler (not timed)")
    parser.add_argument("--note", default="", help="a line added to the results file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        sys.exit(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")

    import torch
    from transformers import AutoConfig

    from fewtune.models import resolve_model_path

    work = Path(tempfile.mkdtemp(prefix="fewtune-speed-"))
    data_path = None
    if not args.config:
        data_path = str(work / "snips_train.jsonl")
        rows = snips_rows(args.snips, args.examples)
        Path(data_path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = make_config(args, data_path, "fewtune", str(work / "probe"))
    load_before = load_average()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = matmul_peak_flops(device)
    print(f"machine: {machine()}\nload average before: {load_before}\nmatmul peak: "
          + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items()), flush=True)

    results = {}
    for arm in arms:
        spec = {"arm": arm, "data": data_path, "run_dir": str(work / arm), "result": str(work / f"{arm}.json")}
        spec_path = work / f"{arm}.spec.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, __file__, "--worker", str(spec_path)] + [
            a for a in sys.argv[1:] if a != "--worker"]
        print(f"--- {arm}: {ARMS[arm]}", flush=True)
        start = time.time()
        proc = subprocess.run(cmd, cwd=ROOT)  # the child imports the fewtune this process imported (same environment)
        if proc.returncode != 0:
            sys.exit(f"arm '{arm}' failed (exit {proc.returncode})")
        results[arm] = json.loads(Path(spec["result"]).read_text())
        results[arm].update(summarise(results[arm], args.warmup), wall_s=time.time() - start)
        r = results[arm]
        print(f"    {r['tokens_per_s']:.1f} tokens/s, {r['s_per_step']:.2f} s/step, "
              f"peak {r['peak_memory'] / 2**20:.0f} MiB ({time.time() - start:.0f} s)", flush=True)
    load_after = load_average()

    from fewtune.data.dataset import load_train_val
    from fewtune.data.cache import cached_render_set
    from fewtune.data.render import Template
    from fewtune.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.name)
    template = Template.from_config(tokenizer, cfg)
    rendered = cached_render_set(load_train_val(cfg.data)[0], tokenizer, template, cfg.data, "training").items
    mean_len = sum(len(r) for r in rendered) / len(rendered)
    model_config = AutoConfig.from_pretrained(resolve_model_path(cfg.model.name))
    lora = next(iter(results.values()))["lora_params"]
    flops = model_flops_per_token(model_config, mean_len, lora)
    peak_flops = max(peak.values()) if device == "cuda" else peak["fp32"]
    if device == "cpu" and peak["bf16"] > peak["fp32"]:
        peak_flops = peak["bf16"]
    report(args, results, machine(), peak, peak_flops, flops, mean_len, len(rendered), load_before, load_after)


def precision_lines(results: dict) -> list[str]:
    """What `auto` chose for the fewtune arm and why, and a warning when the other precision trained faster."""
    auto = results.get("fewtune")
    if not auto or auto.get("precision_setting") != "auto":
        return []
    lines = [f"`auto` chose {'fp32' if auto['precision'] == 'no' else auto['precision']}"
             + (f" ({auto['precision_choice']})." if auto.get("precision_choice") else ".")]
    pinned = {PINNED[a]: results[a]["tokens_per_s"] for a in PINNED if a in results}
    if len(pinned) == 2:
        faster = max(pinned, key=pinned.get)
        name = lambda p: "fp32" if p == "no" else p  # noqa: E731
        if faster != auto["precision"]:
            lines.append(f"**Warning: auto's choice is not the faster one here**: {name(faster)} trained at "
                         f"{pinned[faster]:.1f} tokens/s, {name(auto['precision'])} at {pinned[auto['precision']]:.1f}.")
        else:
            lines.append(f"That is the faster of the two here: fp32 {pinned['no']:.1f} tokens/s, bf16 "
                         f"{pinned['bf16']:.1f} ({pinned['bf16'] / pinned['no']:.2f}x).")
    return lines


def report(args, results, info, peak, peak_flops, flops, mean_len, n_examples, load_before, load_after) -> None:
    base = results.get("baseline")
    lines = ["| arm | what | precision | tokens/s | s/step | peak memory | MFU | HFU | vs baseline |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for arm, r in results.items():
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mem = f"{r['peak_memory'] / 2**20:,.0f} MiB" + (" RSS" if r["device"] == "cpu" else " alloc")
        mfu = r["tokens_per_s"] * flops / peak_flops
        hfu = "-"
        if r.get("step0_flops") and r["tokens"]:
            hfu = f"{100 * r['tokens_per_s'] * r['step0_flops'] / r['tokens'][0] / peak_flops:.1f}%"
        lines.append(f"| {arm} | {ARMS[arm]} | {r['precision']} | {r['tokens_per_s']:.1f} | {r['s_per_step']:.2f} | "
                     f"{mem} | {100 * mfu:.1f}% | {hfu} | {ratio} |")
    table = "\n".join(lines)
    print("\n" + table + "\n")
    choice = precision_lines(results)
    for line in choice:
        print(line)
    if base and "fewtune" in results:
        f = results["fewtune"]
        print(f"fewtune vs baseline: {f['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s, peak memory "
              f"{f['peak_memory'] / 2**20:.0f} vs {base['peak_memory'] / 2**20:.0f} MiB")
    source = f"config {args.config}" if args.config else (
        f"SNIPS train split ({n_examples} classification prompts, system prompt listing the 7 intents), "
        f"model {args.model}, LoRA r=8 alpha=16 dropout=0.05 on all linear layers")
    cmd = "python benchmarks/train_speed.py " + " ".join(a for a in sys.argv[1:])
    text = [
        "# Training speed", "",
        f"Command: `{cmd.strip()}`", "",
        f"Data: {source}; mean {mean_len:.1f} tokens per example; batch size {args.batch_size}; "
        f"{args.warmup} warm-up steps, then {args.steps} timed steps per arm, each arm in its own process.", "",
        table, "", *choice, *([""] if choice else []),
        f"Machine: {info['cpu']}, {info['cores']} cores, CPU bf16 flags: {', '.join(info['cpu_bf16_flags'])}; "
        f"PyTorch {info['torch']} (CPU capability {info['cpu_capability']}), transformers {info['transformers']}, "
        f"peft {info['peft']}, accelerate {info['accelerate']}, Python {info['python']}"
        + (f"; GPU {info['gpu']}" if "gpu" in info else "; no GPU") + ".",
        f"Load average (1/5/15 min) before: {load_before}; after: {load_after}.",
        "Matrix-multiply peak (1024^3 probe): " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items())
        + f"; MFU uses {peak_flops / 1e9:.1f} GFLOP/s and {flops / 1e6:.0f} MFLOP per token "
          "(plain forward + input-gradient backward, all logits, attention, LoRA: the same count for every arm, "
          "so MFU ratios equal tokens/s ratios). HFU counts the FLOPs each arm actually executes "
          "(torch.utils.flop_counter on its first step; work it skips is not counted).",
        "Executed MFLOP per example token: " + ", ".join(
            f"{a} {r['step0_flops'] / r['tokens'][0] / 1e6:.0f}" for a, r in results.items()
            if r.get("step0_flops") and r["tokens"]) + ".",
        "Threads per arm: " + ", ".join(f"{a} {r['threads']}" for a, r in results.items()) + ".",
        "First timed losses: " + ", ".join(f"{a} {r['losses'][args.warmup] if len(r['losses']) > args.warmup else float('nan'):.3f}"
                                         for a, r in results.items()) + ".",
    ]
    if args.note:
        text += ["", args.note]
    profiled = {a: r["profile"] for a, r in results.items() if r.get("profile")}
    if profiled:
        text += ["", "## Where the time goes", "",
                 f"torch.profiler over {PROFILE_STEPS} steps after the timed ones, share of operator (self) CPU time:", ""]
        for arm, prof in profiled.items():
            shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in prof["shares"].items())
            top = ", ".join(f"`{name}` {100 * share:.0f}% ({count})" for name, share, count in prof["top"][:6])
            text += [f"- **{arm}** ({prof['total_s']:.2f} s of operators per step): {shares}. Top ops: {top}."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
    kept = "\n" + NOTES + old.split(NOTES, 1)[1] if NOTES in old else ""  # the hand-written notes and history
    args.out.write_text("\n".join(text) + "\n" + kept, encoding="utf-8")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
