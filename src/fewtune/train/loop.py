"""The training loop: our own, short, on accelerate.

Loss is normalised by the total loss weight of the whole accumulated (and, across
processes, global) batch, so accumulation and data parallelism give the same gradient
as one big batch. Data order is a seeded permutation per epoch, so a resumed run sees
exactly the examples an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fewtune.config import TASK_METRICS, Config, save_config
from fewtune.data.cache import cached_render_set
from fewtune.data.dataset import RenderedSet, load_train_val
from fewtune.data.render import Template
from fewtune.models import load_tokenizer
from fewtune.runinfo import RunFormatError, check_run_format, write_marker
from fewtune.train import checkpoint as ckpt
from fewtune.train import fingerprint, runtime
from fewtune.train.batching import batch_weight, collate, pack, setup_packing
from fewtune.train.loss import WeightedLMLoss
from fewtune.train.adapters import load_base
from fewtune.train.regularise import StepExtras
from fewtune.train.replay import add_replay
from fewtune.train.methods import apply_method, load_trainable_state, parameter_counts, trainable_state
from fewtune.train.packed_attention import attention_implementation, restore_attention

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    pass


class Interrupted(Exception):
    """Raised after Ctrl-C or SIGTERM (at the next step boundary) once the checkpoint is safely written."""

    def __init__(self, run_dir: Path, step: int, signum: int = signal.SIGINT):
        self.run_dir, self.step, self.signum = run_dir, step, signum
        # the shell's convention: 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM)
        self.exit_code = 128 + int(signum)
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        super().__init__(f"{how} at step {step}; checkpoint saved. Resume with: fewtune train --resume {run_dir}")


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    best_val_loss: float | None
    stopped_early: bool
    wall_s: float


def epoch_batches(lengths: list[int], batch_size: int, world: int, rank: int, seed: int, epoch: int,
                  group_by_length: bool = False) -> list[list[int]]:
    """This process's share of each global batch of the epoch (global batch = batch_size * world).

    With ``group_by_length``, the shuffled order is cut into windows of 32 global batches,
    each window is sorted by length and cut into batches, and the batches are shuffled:
    batches of similar length waste little on padding, and their order stays random.
    """
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    n = len(lengths)
    order = torch.randperm(n, generator=generator).tolist()
    step = batch_size * world
    if group_by_length:
        window = step * 32
        order = [j for i in range(0, n, window) for j in sorted(order[i:i + window], key=lambda j: -lengths[j])]
    batches = [order[i:i + step] for i in range(0, n, step)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return [b[rank * batch_size:(rank + 1) * batch_size] for b in batches]


def _optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "norm" not in name.lower() else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # one fused kernel for all tensors instead of a Python loop over hundreds of small LoRA
    # matrices (about 9x faster per step on CPU); float32 trainables are kept for this
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused or None)


def _scheduler(optimizer, cfg: Config, total_steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(cfg.train.scheduler, cfg.train.scheduler)
    extra = {"num_cycles": cfg.train.num_cycles} if name == "cosine_with_restarts" else {}
    return get_scheduler(name, optimizer, num_warmup_steps=math.ceil(cfg.train.warmup_ratio * total_steps),
                         num_training_steps=total_steps, scheduler_specific_kwargs=extra)


def _resolve_precision(setting: str, run_dir: Path, resume: bool) -> str:
    """The run's mixed precision. A resumed ``auto`` run keeps what its first session chose: the probe
    behind ``auto`` is a timing, and a busy machine could tip it the other way halfway through a run."""
    if setting == "auto" and resume and runtime.forced_precision() is None:
        for folder in ckpt.checkpoints_newest_first(run_dir):
            try:
                chosen = json.loads((folder / "loop.json").read_text()).get("mixed_precision")
            except (OSError, ValueError):
                continue
            if chosen:
                log.info("mixed precision auto: %s, as the run's first session chose", chosen)
                return chosen
    try:
        return runtime.resolve_mixed_precision(setting)
    except ValueError as err:
        raise TrainingError(str(err)) from None


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path | None = None, resume: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.train.output_dir)
        if resume:
            try:  # a run directory a newer fewtune wrote (or whose marker is damaged) is not continued
                check_run_format(self.run_dir)
            except RunFormatError as err:
                raise TrainingError(str(err)) from None
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        # without cpu=True accelerate sees no distributed setup on a machine without GPUs, and
        # torchrun's processes would each train alone on all the data, into the same folder
        cpu = launched > 1 and not torch.cuda.is_available()
        precision = _resolve_precision(cfg.train.mixed_precision, self.run_dir, resume)
        if launched == 1:
            runtime.reset_accelerate_precision(precision)
        self.accelerator = Accelerator(mixed_precision=precision, cpu=cpu)
        for kind in ("FSDP", "DEEPSPEED"):
            if os.environ.get(f"ACCELERATE_USE_{kind}", "").lower() == "true" and \
                    self.accelerator.distributed_type.value != kind:
                log.warning("the accelerate config asks for %s but this run is %s (accelerate uses %s with GPUs only)",
                            kind, self.accelerator.distributed_type.value, kind)
        if self.accelerator.num_processes != launched:
            raise TrainingError(f"launched as {launched} processes but accelerate set up "
                                f"{self.accelerator.num_processes}: check the launcher and its environment")
        if self.accelerator.device.type == "cpu":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.accelerator.num_processes))
            threads = runtime.configure_threads(cfg.train.num_threads, local)
            log.info("CPU threads per process: %d (mixed precision: %s)", threads, self.accelerator.mixed_precision)
        set_seed(cfg.train.seed)
        self.tokenizer = load_tokenizer(cfg.model.name)
        self.template = Template.for_tokenizer(self.tokenizer, cfg.model.template, cfg.model.separator,
                                               cfg.model.stop, cfg.data.system_prompt)
        train_examples, val_examples = load_train_val(cfg.data)
        train_examples = add_replay(train_examples, cfg, self.run_dir)
        cache = cfg.train.cache_tokenized
        self.train_set: RenderedSet = cached_render_set(train_examples, self.tokenizer, self.template, cfg.data,
                                                        "training", cache)
        self.val_set: RenderedSet = cached_render_set(val_examples, self.tokenizer, self.template, cfg.data,
                                                      "validation", cache)
        if not self.train_set.items:
            raise TrainingError("no training example is left after dropping the ones with nothing to learn")
        self.lengths = [len(r) for r in self.train_set.items]
        model = load_base(cfg.model, cfg.method)
        self.model = apply_method(model, cfg.method, cfg.model.name)
        runtime.keep_trainable_fp32(self.model)
        if cfg.train.gradient_checkpointing:
            runtime.enable_gradient_checkpointing(self.model)
        self.trainable, self.total = parameter_counts(self.model)
        self.loss_module = WeightedLMLoss(self.model, chunk_size=cfg.train.loss_chunk_size,
                                          label_smoothing=cfg.regularise.label_smoothing)
        self.base_model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.attention_before = attention_implementation(self.base_model)
        self.packing = cfg.train.packing and setup_packing(self.loss_module, cfg.train.share_prefix)
        optimizer = _optimizer(self.model, cfg.train.resolved_lr(cfg.method.name), cfg.train.weight_decay)
        world = self.accelerator.num_processes
        self.batches_per_epoch = math.ceil(len(self.train_set.items) / (cfg.train.batch_size * world))
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.train.grad_accum)
        self.total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * self.steps_per_epoch)
        self.loss_module, self.optimizer = self.accelerator.prepare(self.loss_module, optimizer)
        self.scheduler = _scheduler(self.optimizer, cfg, self.total_steps)
        self.extras = StepExtras(self)
        self.inputs = fingerprint.run_inputs(cfg, self.train_set, self.val_set)
        # wall_s: training time of the earlier sessions of a resumed run, up to their last checkpoint
        self.state = {"step": 0, "epoch": 0, "batch": 0, "best_val": None, "best_step": None, "bad_evals": 0,
                      "stopped_early": False, "tokens": 0, "last_eval_step": 0, "wall_s": 0.0,
                      "mixed_precision": self.accelerator.mixed_precision}
        self._session_start = time.time()
        self._wall_at_session_start = 0.0

    def make_batch(self, items) -> dict[str, torch.Tensor]:
        """A micro-batch as the loss module takes it: one packed row, or a padded batch."""
        if self.packing:
            return pack(items, self.cfg.train.share_prefix)
        return collate(items, self.tokenizer.pad_token_id)

    # -------------------------------------------------------------- bookkeeping

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def _log(self, record: dict) -> None:
        if self.main:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def _wall_s(self) -> float:
        """Training time of the whole run: the earlier sessions (to their last checkpoint) plus this one."""
        return self._wall_at_session_start + time.time() - self._session_start

    def _save_checkpoint(self) -> None:
        self.accelerator.wait_for_everyone()
        self.state["wall_s"] = round(self._wall_s(), 3)
        if self.main:
            try:
                ckpt.save_checkpoint(self.run_dir, self.state["step"], trainable_state(self.model), self.optimizer,
                                     self.scheduler, {**self.state, "inputs": self.inputs},
                                     self.cfg.train.keep_checkpoints)
            except ckpt.CheckpointError as err:
                raise TrainingError(str(err)) from err
        self.accelerator.wait_for_everyone()

    def _prepare_run_dir(self, resume: bool) -> None:
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                for stale in ("metrics.jsonl", "summary.json"):
                    (self.run_dir / stale).unlink(missing_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            write_marker(self.run_dir)
            self.template.save(self.run_dir / "template.json")
            self.tokenizer.save_pretrained(self.run_dir / "tokenizer")
        self.accelerator.wait_for_everyone()

    def resume(self, force: bool = False) -> bool:
        """Continue from the newest intact checkpoint; refuse (unless forced) when the inputs changed since."""
        try:
            folder = ckpt.newest_intact_checkpoint(self.run_dir)
        except ckpt.CheckpointError as err:
            raise TrainingError(str(err)) from None
        if folder is None:
            return False
        weights, state, loop_state = ckpt.load_checkpoint(folder)
        saved_inputs = loop_state.pop("inputs", None)
        if saved_inputs is not None:
            changed = fingerprint.changes(saved_inputs, self.inputs)
            if changed and not force:
                raise TrainingError(f"cannot resume {self.run_dir}: its inputs changed since checkpoint {folder.name}:\n  "
                                    + "\n  ".join(changed) + "\nRestore them, start a new run (another "
                                    "train.output_dir), or resume anyway with --force (train.force_resume=true)")
            for line in changed:
                log.warning("resuming although %s (forced)", line)
        load_trainable_state(self.model, weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.state.update(loop_state)  # in place: fit() holds a reference to this dict
        self._wall_at_session_start = float(self.state.get("wall_s", 0.0))
        before, now = loop_state.get("mixed_precision"), self.accelerator.mixed_precision
        if before and before != now:
            log.warning("this session trains in mixed precision %s; the run began in %s (%s), so it will not "
                        "end exactly where an uninterrupted run would", now, before,
                        f"{runtime.PRECISION_ENV} is set" if runtime.forced_precision() else "train.mixed_precision")
        self.state["mixed_precision"] = now
        # checkpoints from before last_eval_step was kept: take the evaluation then due as the last one
        if "last_eval_step" not in loop_state and self.cfg.train.eval_every:
            self.state["last_eval_step"] = self.state["step"] - self.state["step"] % self.cfg.train.eval_every
        # metrics written after that checkpoint belong to the lost tail of the interrupted run
        path = self.run_dir / "metrics.jsonl"
        if self.main and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= self.state["step"]]
            path.write_text("".join(line + "\n" for line in kept))
        log.info("resumed from %s (step %d)", folder, self.state["step"])
        return True

    # -------------------------------------------------------------- evaluation

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        items = self.val_set.items
        if not items:
            return None
        self.loss_module.eval()
        acc = self.accelerator
        total = torch.zeros(2, device=acc.device)
        size = self.cfg.train.batch_size
        shard = items[acc.process_index::acc.num_processes]
        for i in range(0, len(shard), size):
            batch = {k: v.to(acc.device) for k, v in self.make_batch(shard[i:i + size]).items()}
            with acc.autocast():
                loss_sum, weight = self.loss_module(**batch)
            total += torch.stack([loss_sum.float(), weight.float()])
        total = acc.reduce(total, "sum")
        self.loss_module.train()
        return (total[0] / total[1]).item()

    def _task_metrics(self) -> dict[str, float]:
        """train.eval_task's metrics on the validation set (or a seeded sample of it); {} when not asked."""
        cfg = self.cfg.train
        if not cfg.eval_task or not self.val_set.examples:
            return {}
        import random

        from fewtune.eval.evaluate import expected_label, task_metrics
        from fewtune.generate import Loaded, PromptError

        examples = self.val_set.examples
        if cfg.eval_sample and cfg.eval_sample < len(examples):
            examples = random.Random(cfg.seed).sample(examples, cfg.eval_sample)
        labels = None
        if cfg.eval_task == "classification":
            labels = sorted({expected_label(e) for e in self.train_set.examples + self.val_set.examples})
        model = self.accelerator.unwrap_model(self.loss_module).model
        model.eval()
        try:
            with self.accelerator.autocast():
                metrics, _ = task_metrics(Loaded(model, self.tokenizer, self.template, self.cfg, str(self.run_dir)),
                                          examples, cfg.eval_task, labels, cfg.eval_mode, cfg.batch_size,
                                          self.cfg.generate, progress=False)
        except PromptError as err:  # a validation prompt that leaves no room for generate.max_new_tokens
            raise TrainingError(f"train.eval_task={cfg.eval_task} cannot generate for the validation set: {err}. "
                                "Lower generate.max_new_tokens or data.max_length, or set train.eval_mode=choice") from None
        finally:
            model.train()
        return {k: float(metrics[k]) for k in TASK_METRICS[cfg.eval_task] if k in metrics}

    def _evaluate(self) -> bool:
        """Validation loss (and task metric), best-checkpoint bookkeeping, early stopping. True means stop."""
        val = self.validation_loss()
        if val is None:
            return False
        s, es = self.state, self.cfg.train.early_stopping
        task, metric = self._task_metrics(), self.cfg.train.eval_metric
        if metric == "loss":
            improved = s["best_val"] is None or val < s["best_val"] - es.min_delta
        else:  # task metrics are higher-is-better
            best = s.get("best_metric")
            # on a small validation set accuracy ties often (25/28 three times); on a tie the lower loss wins, where
            # keeping the first would keep the least trained of equally accurate checkpoints
            improved = best is None or task[metric] > best + es.min_delta or (
                best <= task[metric] and val < s["best_val"])
        if improved:
            s["best_val"], s["best_step"], s["bad_evals"] = val, s["step"], 0
            if metric != "loss":
                s["best_metric"] = task[metric]
            if self.main:
                try:
                    ckpt.save_weights(trainable_state(self.model), self.run_dir / "best")
                except ckpt.CheckpointError as err:
                    raise TrainingError(str(err)) from err
        else:
            s["bad_evals"] += 1
        self._log({"step": s["step"], "epoch": round(s["epoch"] + s["batch"] / self.batches_per_epoch, 4),
                   "val_loss": val, **{f"val_{k}": v for k, v in task.items()}, "best": improved})
        if es.enabled and s["bad_evals"] >= es.patience:
            best = s["best_val"] if metric == "loss" else s["best_metric"]
            log.info("early stopping at step %d: validation %s has not improved for %d evaluations (best %.4f at step %d)",
                     s["step"], metric, s["bad_evals"], best, s["best_step"])
            s["stopped_early"] = True
            return True
        return False

    # -------------------------------------------------------------- training

    def _train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        acc = self.accelerator
        local_weight = sum(batch_weight(b) for b in micro_batches).to(acc.device)
        global_weight = acc.reduce(local_weight.clone(), "sum").item()
        if global_weight <= 0:
            raise TrainingError("a batch has no token with loss weight (should have been caught when rendering)")
        loss_total = torch.zeros((), device=acc.device)
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            sync = i == len(micro_batches) - 1
            # the backward pass must run inside no_sync too: DDP all-reduces during backward
            with acc.no_sync(self.loss_module) if not sync else nullcontext():
                with acc.autocast():
                    loss_sum, _ = self.loss_module(**batch)
                    # DDP averages gradients over processes, hence the factor num_processes
                    loss = loss_sum / global_weight * acc.num_processes
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss.item()} at step {self.state['step'] + 1}: training diverged. "
                        f"Lower train.lr (now {self.cfg.train.resolved_lr(self.cfg.method.name)}), keep "
                        "train.max_grad_norm set, raise train.warmup_ratio, or check model.dtype.")
                self.extras.backward(loss, batch, global_weight)
            loss_total += loss_sum.detach()
        # the norm is taken even without clipping (max_norm inf): a non-finite gradient under a finite loss (an
        # overflow in the backward pass) must stop the run before it writes NaN into every weight
        norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.train.max_grad_norm or float("inf"))
        grad_norm = float(norm) if norm is not None else float("nan")  # DeepSpeed may not report one
        if norm is not None and not math.isfinite(grad_norm) and acc.mixed_precision != "fp16":
            # (fp16's loss scaler skips such steps by design and lowers its scale)
            raise TrainingError(
                f"the gradient norm became {grad_norm} at step {self.state['step'] + 1} (mixed precision: "
                f"{acc.mixed_precision}) although the loss was finite: an overflow in the backward pass. Lower "
                f"train.lr (now {self.cfg.train.resolved_lr(self.cfg.method.name)}), keep train.max_grad_norm set, "
                "or train in float32 (train.mixed_precision=no)")
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:  # fp16 loss scaling skips steps whose gradients overflowed
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return acc.reduce(loss_total, "sum").item() / global_weight, grad_norm

    def _stop_signal(self) -> int:
        """The stop signal any process received (0: none). All processes stop at the same step: a launcher
        forwards the signal to each, but they may be at different steps when it arrives."""
        if self.accelerator.num_processes == 1:
            return self._stop_requested
        flag = torch.tensor(int(self._stop_requested), device=self.accelerator.device)
        return int(self.accelerator.reduce(flag, "max").item())

    def _catch_stop_signals(self) -> dict:
        """Ctrl-C (SIGINT) and SIGTERM (what SLURM, Kubernetes and `timeout` send): finish the current step,
        checkpoint, stop. The same signal again stops at once."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum, frame):
            self._stop_requested = signum
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            log.warning("%s: stopping after this step and saving a checkpoint (send it again to abort at once)", name)

        return {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    def fit(self, resume: bool = False, stop_after: int | None = None, force: bool = False) -> TrainResult:
        """Train to the end (or early stop). ``stop_after`` stops like Ctrl-C after that many steps; ``force``
        resumes even when the data, model or training keys changed since the checkpoint."""
        cfg, s, acc = self.cfg, self.state, self.accelerator
        resumed = self.resume(force or cfg.train.force_resume) if resume else False
        if resume and not resumed:
            log.warning("no checkpoint in %s: starting from the beginning", self.run_dir)
        self._prepare_run_dir(resumed)
        if self.main:
            log.info("trainable parameters: %s of %s (%.2f%%)", f"{self.trainable:,}", f"{self.total:,}",
                     100 * self.trainable / self.total)
            self._log({"step": s["step"], "event": "start", "trainable_params": self.trainable,
                       "total_params": self.total, "train_examples": len(self.train_set.items),
                       "val_examples": len(self.val_set.items), "dropped": len(self.train_set.dropped),
                       "total_steps": self.total_steps})
        start, tokens_at_start = time.time(), s["tokens"]
        self._session_start = start
        bar = tqdm(total=self.total_steps, initial=s["step"], desc="train", disable=not self.main, dynamic_ncols=True)
        steps_this_session = 0
        self._stop_requested = 0
        previous_handlers = self._catch_stop_signals()
        try:
            self.loss_module.train()
            while s["step"] < self.total_steps and not s["stopped_early"]:
                batches = self.extras.curriculum_batches(s["epoch"]) or epoch_batches(
                    self.lengths, cfg.train.batch_size, acc.num_processes, acc.process_index, cfg.train.seed,
                    s["epoch"], cfg.train.group_by_length)
                while s["batch"] < len(batches) and s["step"] < self.total_steps:
                    group = batches[s["batch"]:s["batch"] + cfg.train.grad_accum]
                    step_start = time.time()
                    micro = [self.make_batch([self.train_set.items[i] for i in idx]) for idx in group]
                    loss, grad_norm = self._train_step(micro)
                    # real tokens of the examples (no padding; a shared prefix counts once per example)
                    tokens = acc.reduce(torch.tensor(sum(len(self.train_set.items[i]) for idx in group for i in idx),
                                                     device=acc.device), "sum").item()
                    s["tokens"] += tokens
                    s["batch"] += len(group)
                    s["step"] += 1
                    steps_this_session += 1
                    lr = self.scheduler.get_last_lr()[0]
                    elapsed = time.time() - start
                    tok_s = (s["tokens"] - tokens_at_start) / max(elapsed, 1e-9)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
                    if s["step"] % cfg.train.log_every == 0:
                        self._log({"step": s["step"], "epoch": round(s["epoch"] + s["batch"] / len(batches), 4),
                                   "train_loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                                   "step_s": round(time.time() - step_start, 4), "tokens_per_s": round(tok_s, 1),
                                   "elapsed_s": round(elapsed, 4)})
                    end_of_epoch = s["batch"] >= len(batches)
                    # eval_every counts from the last evaluation, so an epoch-end one is not followed a step or two
                    # later by a periodic one that sees nearly the same weights and costs early-stopping patience
                    periodic = cfg.train.eval_every and s["step"] - s["last_eval_step"] >= cfg.train.eval_every
                    if periodic or end_of_epoch or s["step"] == self.total_steps:
                        if end_of_epoch:
                            s["epoch"], s["batch"] = s["epoch"] + 1, 0
                        s["last_eval_step"] = s["step"]
                        if self._evaluate():
                            break
                    if (cfg.train.save_every and s["step"] % cfg.train.save_every == 0) or s["batch"] == 0:
                        self._save_checkpoint()
                    stop = self._stop_signal()
                    if stop or (stop_after is not None and steps_this_session >= stop_after):
                        # at a step boundary: weights, optimizer and loop position agree
                        bar.close()
                        self._save_checkpoint()
                        raise Interrupted(self.run_dir, s["step"], stop or signal.SIGINT)
                if s["batch"] >= len(batches):
                    s["epoch"], s["batch"] = s["epoch"] + 1, 0
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        bar.close()
        self._save_checkpoint()
        return self._finish(self._wall_s())

    def _finish(self, wall_s: float) -> TrainResult:
        s = self.state
        if self.packing:  # the trained model leaves with the attention it came with
            restore_attention(self.base_model, self.attention_before)
        best = self.run_dir / "best"
        damaged = ckpt.verify(best) if s["best_val"] is not None and best.exists() else None
        if damaged:  # e.g. a run directory copied in half between two sessions
            log.warning("the best weights in %s are damaged (%s): the run ends with the weights of its last step, %d",
                        best, damaged, s["step"])
        elif s["best_val"] is not None and best.exists():
            load_trainable_state(self.model, ckpt.load_weights(best))
            log.info("loaded the best weights (validation loss %.4f at step %d)", s["best_val"], s["best_step"])
        self.accelerator.wait_for_everyone()
        if self.main:
            model = self.accelerator.unwrap_model(self.loss_module).model
            if self.cfg.method.name != "full":
                model.save_pretrained(self.run_dir / "adapter")
            else:
                model.save_pretrained(self.run_dir / "model")
            summary = {"steps": s["step"], "total_steps": self.total_steps, "best_val_loss": s["best_val"],
                       "best_step": s["best_step"], "eval_metric": self.cfg.train.eval_metric,
                       "best_metric": s.get("best_metric"), "stopped_early": s["stopped_early"], "wall_s": round(wall_s, 2),
                       "trainable_params": self.trainable, "total_params": self.total,
                       "train_examples": len(self.train_set.items), "val_examples": len(self.val_set.items),
                       "dropped_examples": len(self.train_set.dropped) + len(self.val_set.dropped),
                       "partly_truncated": self.train_set.partly_truncated, "train_tokens_seen": s["tokens"]}
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self._log({"step": s["step"], "event": "end", **summary})
            from fewtune.plots import plot_loss_curve

            plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        self.accelerator.wait_for_everyone()
        return TrainResult(self.run_dir, s["step"], s["best_val"], s["stopped_early"], wall_s)


def train(cfg: Config, run_dir: str | Path | None = None, resume: bool | None = None,
          stop_after: int | None = None, force: bool = False) -> TrainResult:
    """Train as configured and write the run directory. The function `fewtune train` calls."""
    resume = cfg.train.resume if resume is None else resume
    trainer = Trainer(cfg, Path(run_dir) if run_dir else None, resume=resume)
    try:
        return trainer.fit(resume=resume, stop_after=stop_after, force=force)
    finally:
        trainer.extras.close()  # the embedding hooks (NEFTune, adversarial) leave the model
