"""The training loop: our own, short, on accelerate.

``Trainer.__init__`` builds the parts (accelerator, data, model and method, loss, optimizer,
regularisers, curriculum); ``fit`` runs the epochs; ``_train_step`` is one optimizer step over
``grad_accum`` micro-batches. Loss is normalised by the total loss weight of the whole
accumulated (and, across processes, global) batch, so accumulation and data parallelism give
the same gradient as one big batch. Data order is a seeded permutation per epoch, so a resumed
run sees exactly the examples an uninterrupted run would.

Callbacks (``trainer.callbacks``: objects with ``on_step_begin(trainer)`` and/or
``on_step_end(trainer)``) run around each optimizer step, e.g. to time it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fewtune.augment.online import build_online_augmenter
from fewtune.config import Config, save_config
from fewtune.data.cache import cached_render_set
from fewtune.data.dataset import RenderedSet, load_train_val
from fewtune.data.replay import add_replay
from fewtune.data.render import Template, shared_system_message
from fewtune.models import load_tokenizer
from fewtune.methods import (MethodError, apply_method, get_method, load_base, load_trainable_state, parameter_counts,
                             trainable_state)
from fewtune import runlog
from fewtune.runinfo import RunFormatError, check_run_format, write_marker
from fewtune.train import tracking
from fewtune.train import checkpoint as ckpt
from fewtune.train import fingerprint, precision_probe, runtime, stages, validate
from fewtune.train.batching import batch_weight, collate, pack, setup_packing
from fewtune.train.loss import WeightedLMLoss
from fewtune.train.optim import build_optimizer, build_scheduler, epoch_batches
from fewtune.train.packed_attention import attention_implementation, restore_attention
from fewtune.train.curriculum import build_curriculum
from fewtune.train.regularise import build_regularisers
from fewtune.train.state import LoopState
from fewtune.vision import vision_for

__all__ = ["Interrupted", "Trainer", "TrainingError", "TrainResult", "collate", "epoch_batches", "train"]

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


def build_training_model(cfg: Config, precision: str) -> tuple:
    """The model as training runs it in ``precision``: (model, loss module, base model, its attention before
    packing, packing on). The trainer, its precision probe and `suggest`'s throughput probe all build it here."""
    model = apply_method(load_base(cfg.model, cfg.method), cfg.method, cfg.model.name, cfg.model.vision)
    runtime.keep_trainable_fp32(model)
    if cfg.model.dtype == "auto" and runtime.store_frozen_low_precision(model, precision):
        log.debug("frozen weights stored in %s, trainable ones in float32", precision)
    if precision in runtime.LOW_DTYPES:
        runtime.skip_adapter_input_casts(model)
    if cfg.train.gradient_checkpointing:
        runtime.enable_gradient_checkpointing(model)
    loss_module = WeightedLMLoss(model, chunk_size=cfg.train.loss_chunk_size,
                                 label_smoothing=cfg.regularise.label_smoothing)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attention_before = attention_implementation(base)
    if cfg.train.packing and loss_module.vision_language:
        log.info("packing is off for a vision-language model: its M-RoPE positions follow each image's grid")
    packing = cfg.train.packing and not loss_module.vision_language and setup_packing(loss_module, cfg.train.share_prefix)
    return model, loss_module, base, attention_before, packing


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path | None = None, resume: bool = False):
        from accelerate.utils import set_seed

        try:  # model.init_from: start from an earlier stage's weights (merged once into a model folder)
            cfg, self.earlier_stages = stages.resolve(cfg)
        except stages.StageError as err:
            raise TrainingError(str(err)) from None
        self.cfg, self.run_dir = cfg, Path(run_dir or cfg.train.output_dir)
        try:
            if resume:  # a run directory a newer fewtune wrote (or whose marker is damaged) is not continued
                check_run_format(self.run_dir)
        except RunFormatError as err:
            raise TrainingError(str(err)) from None
        try:  # before anything loads: a tracker asked for but not installed says what to install
            tracking.check_installed(cfg.train.report_to)
        except tracking.TrackingError as err:
            raise TrainingError(str(err)) from None
        self.trackers = tracking.Trackers.none()
        set_seed(cfg.train.seed)
        self._setup_data()
        self.precision_decision: precision_probe.Decision | None = None
        try:
            precision = runtime.run_precision(cfg.train.mixed_precision, ckpt.checkpoints_newest_first(self.run_dir),
                                              resume, measure=self._measure_precision)
            self.accelerator = runtime.make_accelerator(precision, cfg.train.num_threads)
        except MethodError:  # the probe builds the model first: a method this machine cannot run says so itself
            raise
        except ValueError as err:
            raise TrainingError(str(err)) from None
        adapt = (cfg.train.adapt_threads and cfg.train.num_threads is None and self.accelerator.device.type == "cpu"
                 and self.accelerator.num_processes == 1)
        self.threads = runtime.ThreadGovernor(torch.get_num_threads()) if adapt else None
        self._setup_model()
        self._setup_optimization()
        self.inputs = fingerprint.run_inputs(cfg, self.train_set, self.val_set)
        self.state = LoopState(mixed_precision=self.accelerator.mixed_precision)
        self.callbacks: list = []
        self._session_start, self._wall_at_session_start, self._stop_requested = time.time(), 0.0, 0

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model.name)
        self.template = Template.from_config(self.tokenizer, cfg)
        task_examples, val_examples = load_train_val(cfg.data)
        train_examples = add_replay(task_examples, cfg.data, self.run_dir)
        cache = cfg.train.cache_tokenized
        # a vision-language model: images rendered as image tokens; training images augmented per epoch
        self.vision = vision_for(cfg.model.name, settings=cfg.model.vision)
        with_images = next((e for e in [*train_examples, *val_examples] if e.images), None)
        if with_images is not None and self.vision is None:
            raise TrainingError(f"{with_images.source}:{with_images.line} has images, but {cfg.model.name} is a "
                                "text-only model: use a vision-language model (e.g. a Qwen2-VL folder) or data without "
                                "images")
        self.train_vision = self.vision.for_training(cfg.data.augment.images, cfg.data.augment.seed
                                                     if cfg.data.augment.seed is not None else cfg.train.seed) \
            if self.vision else None
        self.train_set: RenderedSet = cached_render_set(train_examples, self.tokenizer, self.template, cfg.data,
                                                        "training", cache, self.train_vision)
        self.val_set: RenderedSet = cached_render_set(val_examples, self.tokenizer, self.template, cfg.data,
                                                      "validation", cache, self.vision)
        if not self.train_set.items:
            raise TrainingError("no training example is left after dropping the ones with nothing to learn")
        self.lengths = [len(r) for r in self.train_set.items]
        # data.augment: some task examples replaced each epoch by a fresh augmentation (same count, so the same
        # steps per epoch; batches are formed on the originals' lengths, so the order does not depend on it)
        self.augmenter = build_online_augmenter(cfg, self.train_set, task_examples, self.tokenizer, self.template,
                                                self.train_vision)
        self.items = self.train_set.items  # the current epoch's (fit sets them per epoch)
        self.augment_stats: list[dict] = []

    def _build_model(self, precision: str) -> tuple:
        """(model, loss module, base model, its attention before packing, packing on) for ``precision``."""
        return build_training_model(self.cfg, precision)

    def _setup_model(self) -> None:
        self.model, self.loss_module, self.base_model, self.attention_before, self.packing = self._build_model(
            self.accelerator.mixed_precision)
        self.trainable, self.total = parameter_counts(self.model)

    def _measure_precision(self) -> str:
        """auto on a CPU: the precision whose training steps run faster here (precision_probe)."""
        cfg, t = self.cfg, self.cfg.train
        runtime.configure_threads(t.num_threads)
        key = precision_probe.cache_key(cfg.model.name, cfg.method.name, t.batch_size, t.packing, t.share_prefix,
                                        t.gradient_checkpointing)
        order = epoch_batches(self.lengths, t.batch_size, 1, 0, t.seed, 0, t.group_by_length)
        batches = [[self.train_set.items[i] for i in b] for b in order[:precision_probe.PROBE_STEPS]]

        def build(precision: str):
            _, loss_module, _, _, packing = self._build_model(precision)
            return loss_module, (lambda items: pack(items, t.share_prefix)) if packing else (
                lambda items: collate(items, self.tokenizer.pad_token_id))

        def time_steps(precision: str) -> float:
            with precision_probe.RandomStates():
                return precision_probe.time_training_steps(build, batches, precision)

        self.precision_decision = precision_probe.decide(time_steps, key)
        log.info("mixed precision auto on CPU: %s", self.precision_decision.describe())
        return self.precision_decision.chosen

    def _setup_optimization(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        optimizer = build_optimizer(self.model, cfg.train.resolved_lr(cfg.method.name), cfg.train.weight_decay)
        self.batches_per_epoch = math.ceil(len(self.train_set.items) / (cfg.train.batch_size * acc.num_processes))
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.train.grad_accum)
        self.total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * self.steps_per_epoch)
        self.loss_module, self.optimizer = acc.prepare(self.loss_module, optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg.train, self.total_steps)
        # checkpoints carry it through save_state (not prepared: accelerate's wrapper steps it once per process)
        acc.register_for_checkpointing(self.scheduler)
        self._global_weight = 1.0
        self.regularisers = build_regularisers(
            cfg.regularise, model=self.model, loss_module=self.loss_module, accelerator=acc, tokenizer=self.tokenizer,
            template=self.template, data=cfg.data, seed=cfg.train.seed, step_loss=self._scaled_loss, progress=self.main)
        self.curriculum = build_curriculum(
            cfg.data.curriculum, lengths=self.lengths, loss_module=self.loss_module, train_items=self.train_set.items,
            pad_id=self.tokenizer.pad_token_id, accelerator=acc, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
            progress=self.main)

    def make_batch(self, items) -> dict[str, torch.Tensor]:
        """A micro-batch as the loss module takes it: one packed row, or a padded batch."""
        if self.packing:
            return pack(items, self.cfg.train.share_prefix)
        return collate(items, self.tokenizer.pad_token_id)

    def epoch_order(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches of the epoch: the curriculum's order, else a seeded shuffle."""
        t, acc = self.cfg.train, self.accelerator
        order = self.curriculum.batch_order(epoch) if self.curriculum else None
        return order or epoch_batches(
            self.lengths, t.batch_size, acc.num_processes, acc.process_index, t.seed, epoch, t.group_by_length)

    def _use_epoch_items(self, epoch: int) -> None:
        """The epoch's training items: the rendered set, with data.augment's replacements for this epoch."""
        if self.train_vision is not None:
            self.train_vision.epoch = epoch  # image augmentation draws afresh each epoch
        self.items, stats = self.augmenter.epoch_items(epoch)
        if stats is not None:
            record = stats.to_dict()
            self.augment_stats.append(record)
            kept = ", ".join(f"{n} {r}" for r, n in stats.kept_original.items())
            log.info("augment: epoch %d: %d of %d training examples replaced by an augmentation (%s)%s", epoch + 1,
                     sum(stats.replaced.values()), len(self.augmenter.augmentable),
                     ", ".join(f"{m} {n}" for m, n in stats.replaced.items()) or "none",
                     f"; {stats.drawn - sum(stats.replaced.values())} drawn kept their original ({kept})" if kept else "")
            if self.main:
                self._log({"step": self.state.step, "event": "augment", **record})

    # -------------------------------------------------------------- bookkeeping

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def _log(self, record: dict) -> None:
        if self.main:
            runlog.append(self.run_dir / "metrics.jsonl", record)
            self.trackers.log(record)

    def _wall_s(self) -> float:
        """Training time of the whole run: the earlier sessions (to their last checkpoint) plus this one."""
        return self._wall_at_session_start + time.time() - self._session_start

    def _save_checkpoint(self) -> None:
        """Every process takes part (accelerate's save_state writes each one's random states)."""
        self.state.wall_s = round(self._wall_s(), 3)
        try:
            ckpt.save_checkpoint(self.accelerator, self.run_dir, self.state.step, lambda: trainable_state(self.model),
                                 {**self.state.to_dict(), "inputs": self.inputs}, self.cfg.train.keep_checkpoints)
        except ckpt.CheckpointError as err:
            raise TrainingError(str(err)) from err

    def _inference_template(self) -> Template:
        """The template saved with the run, which every inference command renders with: the training template,
        and where the config sets no system prompt but every training example carries the same system message,
        that message as the default for prompts without one (a bare `generate --prompt` then sees what
        training saw)."""
        if self.template.system_prompt is not None:
            return self.template
        shared = shared_system_message(self.train_set.examples)
        if shared is not None:
            log.info("every training example has the same system message: template.json keeps it for prompts "
                     "given without one")
            return dataclasses.replace(self.template, system_prompt=shared)
        if any(e.messages and e.messages[0].role == "system" for e in self.train_set.examples):
            log.info("the training examples carry different system messages: inference prompts need their own "
                     "(--system, or in the data)")
        return self.template

    def _prepare_run_dir(self, resume: bool) -> None:
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                for stale in ("metrics.jsonl", "summary.json"):
                    (self.run_dir / stale).unlink(missing_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            write_marker(self.run_dir)
            self._inference_template().save(self.run_dir / "template.json")
            self.tokenizer.save_pretrained(self.run_dir / "tokenizer")
            if self.vision is not None:  # the image processor renders inference prompts as training did
                self.vision.save(self.run_dir / "tokenizer")
            stages.write_lineage(self.run_dir, [*self.earlier_stages,
                                                stages.stage_entry(self.cfg, self.run_dir, self.train_set.examples)])
        self.accelerator.wait_for_everyone()

    def resume(self, force: bool = False) -> bool:
        """Continue from the newest intact checkpoint; refuse (unless forced) when the inputs changed since."""
        try:
            folder = ckpt.newest_intact_checkpoint(self.run_dir)
        except ckpt.CheckpointError as err:
            raise TrainingError(str(err)) from None
        if folder is None:
            return False
        loop_state = ckpt.read_loop_state(folder)
        saved_inputs = loop_state.pop("inputs", None)
        changed = fingerprint.changes(saved_inputs, self.inputs) if saved_inputs is not None else []
        if changed and not force:
            raise TrainingError(f"cannot resume {self.run_dir}: its inputs changed since checkpoint {folder.name}:\n  "
                                + "\n  ".join(changed) + "\nRestore them, start a new run (another "
                                "train.output_dir), or resume anyway with --force (train.force_resume=true)")
        for line in changed:
            log.warning("resuming although %s (forced)", line)
        ckpt.restore(self.accelerator, folder, lambda weights: load_trainable_state(self.model, weights),
                     self.optimizer, self.scheduler)
        self.state = LoopState.from_dict(loop_state, self.cfg.eval.every)
        # an evaluation ranked then whose weights a later one (of the lost tail) pushed out is gone for good
        self.state.ranked = [e for e in self.state.ranked if ckpt.ranked_folder(self.run_dir, e["step"]).is_dir()]
        self._wall_at_session_start = self.state.wall_s
        before, now = self.state.mixed_precision, self.accelerator.mixed_precision
        if before and before != now:
            log.warning("this session trains in mixed precision %s; the run began in %s (%s), so it will not "
                        "end exactly where an uninterrupted run would", now, before,
                        f"{runtime.PRECISION_ENV} is set" if runtime.forced_precision() else "train.mixed_precision")
        self.state.mixed_precision = now
        # metrics written after that checkpoint belong to the lost tail of the interrupted run
        if self.main:
            runlog.keep_until(self.run_dir / "metrics.jsonl", self.state.step)
            # best-ranked/ as it was at that checkpoint: weights of later evaluations go
            ckpt.keep_ranked(self.run_dir, self.state.ranked, None, self.state.step)
        log.info("resumed from %s (step %d)", folder, self.state.step)
        return True

    # -------------------------------------------------------------- evaluation

    def validation_loss(self) -> float | None:
        return validate.validation_loss(self.loss_module, self.val_set.items, self.make_batch, self.accelerator,
                                        self.cfg.train.batch_size)

    def _task_metrics(self) -> dict[str, float]:
        from fewtune.generate import PromptError

        model = self.accelerator.unwrap_model(self.loss_module).model
        try:
            return validate.task_metrics(model, self.tokenizer, self.template, self.cfg, str(self.run_dir),
                                         self.accelerator, self.train_set.examples, self.val_set.examples)
        except PromptError as err:  # a validation prompt that leaves no room for generate.max_new_tokens
            raise TrainingError(f"eval.task={self.cfg.eval.task} cannot generate for the validation set: "
                                f"{err}. Lower generate.max_new_tokens (or eval.max_new_tokens) or data.max_length, "
                                "or set eval.mode=choice") from None

    def _evaluate(self) -> bool:
        """Validation loss (and task metric), best-checkpoint bookkeeping, early stopping. True means stop."""
        val = self.validation_loss()
        if val is None:
            return False
        s, es, metric = self.state, self.cfg.eval.early_stopping, self.cfg.eval.metric
        task = self._task_metrics()
        better = validate.improved(s, val, task, metric, es)
        if better:
            s.best_val, s.best_step, s.bad_evals = val, s.step, 0
            if metric != "loss":
                s.best_metric = task[metric]
            if self.main:
                try:
                    ckpt.save_weights(trainable_state(self.model), self.run_dir / "best")
                except ckpt.CheckpointError as err:
                    raise TrainingError(str(err)) from err
        else:
            s.bad_evals += 1
        if self.cfg.train.keep_best > 1:  # (with 1, best/ is the whole ranking)
            entry = {"step": s.step, "val_loss": val, "metric": task.get(metric)}
            entered = validate.update_ranking(s.ranked, entry, metric, self.cfg.train.keep_best)
            if self.main:
                try:
                    ckpt.keep_ranked(self.run_dir, s.ranked, trainable_state(self.model) if entered else None, s.step)
                except ckpt.CheckpointError as err:
                    raise TrainingError(str(err)) from err
        self._log({"step": s.step, "epoch": round(s.epoch + s.batch / self.batches_per_epoch, 4),
                   "val_loss": val, **{f"val_{k}": v for k, v in task.items()}, "best": better})
        if es.enabled and s.bad_evals >= es.patience:
            best = s.best_val if metric == "loss" else s.best_metric
            log.info("early stopping at step %d: validation %s has not improved for %d evaluations (best %.4f at step %d)",
                     s.step, metric, s.bad_evals, best, s.best_step)
            s.stopped_early = True
        return s.stopped_early

    # -------------------------------------------------------------- training

    def _scaled_loss(self, batch) -> torch.Tensor:
        """A micro-batch's share of the step's loss; DDP averages gradients over processes, hence the factor."""
        with self.accelerator.autocast():
            loss_sum, _ = self.loss_module(**batch)
        return loss_sum / self._global_weight * self.accelerator.num_processes

    def _train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        acc, regs = self.accelerator, self.regularisers
        local_weight = sum(batch_weight(b) for b in micro_batches).to(acc.device)
        self._global_weight = global_weight = acc.reduce(local_weight.clone(), "sum").item()
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
                    loss = loss_sum / global_weight * acc.num_processes
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss.item()} at step {self.state.step + 1}: training diverged. "
                        f"Lower train.lr (now {self.cfg.train.resolved_lr(self.cfg.method.name)}), keep "
                        "train.max_grad_norm set, raise train.warmup_ratio, or check model.dtype.")
                penalty = regs.penalty(self.state.step)
                acc.backward(loss if penalty is None else loss + penalty)
                regs.after_backward(batch)
            loss_total += loss_sum.detach()
        # the norm is taken even without clipping (max_norm inf): a non-finite gradient under a finite loss (an
        # overflow in the backward pass) must stop the run before it writes NaN into every weight
        norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.train.max_grad_norm or float("inf"))
        grad_norm = float(norm) if norm is not None else float("nan")  # DeepSpeed may not report one
        if norm is not None and not math.isfinite(grad_norm) and acc.mixed_precision != "fp16":
            # (fp16's loss scaler skips such steps by design and lowers its scale)
            raise TrainingError(
                f"the gradient norm became {grad_norm} at step {self.state.step + 1} (mixed precision: "
                f"{acc.mixed_precision}) although the loss was finite: an overflow in the backward pass. Lower "
                f"train.lr (now {self.cfg.train.resolved_lr(self.cfg.method.name)}), keep train.max_grad_norm set, "
                "or train in float32 (train.mixed_precision=no)")
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:  # fp16 loss scaling skips steps whose gradients overflowed
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return acc.reduce(loss_total, "sum").item() / global_weight, grad_norm

    def _step(self, group: list[list[int]]) -> dict:
        """One optimizer step over the group's micro-batches, with the callbacks around it; its log record."""
        s, acc = self.state, self.accelerator
        started = time.time()
        micro = [self.make_batch([self.items[i] for i in idx]) for idx in group]
        for callback in self.callbacks:
            getattr(callback, "on_step_begin", lambda trainer: None)(self)
        loss, grad_norm = self._train_step(micro)
        for callback in self.callbacks:
            getattr(callback, "on_step_end", lambda trainer: None)(self)
        # real tokens of the examples (no padding; a shared prefix counts once per example)
        tokens = acc.reduce(torch.tensor(sum(len(self.items[i]) for idx in group for i in idx),
                                         device=acc.device), "sum").item()
        s.tokens, s.batch, s.step = s.tokens + tokens, s.batch + len(group), s.step + 1
        return {"step": s.step, "train_loss": loss, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "tokens": tokens, "step_s": round(time.time() - started, 4)}

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

    def _begin(self, resume: bool, force: bool) -> None:
        resumed = self.resume(force or self.cfg.train.force_resume) if resume else False
        if resume and not resumed:
            log.warning("no checkpoint in %s: starting from the beginning", self.run_dir)
        self._prepare_run_dir(resumed)
        if self.main:
            self.trackers = tracking.Trackers(self.cfg, self.run_dir, resumed)
        if self.main:
            log.info("trainable parameters: %s of %s (%.2f%%)", f"{self.trainable:,}", f"{self.total:,}",
                     100 * self.trainable / self.total)
        self._log({"step": self.state.step, "event": "start", "trainable_params": self.trainable,
                   "total_params": self.total, "train_examples": len(self.train_set.items),
                   "val_examples": len(self.val_set.items), "dropped": len(self.train_set.dropped),
                   "total_steps": self.total_steps, "mixed_precision": self.accelerator.mixed_precision,
                   **({"precision_choice": self.precision_decision.describe()} if self.precision_decision else {})})

    def fit(self, resume: bool = False, stop_after: int | None = None, force: bool = False) -> TrainResult:
        """Train to the end (or early stop). ``stop_after`` stops like Ctrl-C after that many steps; ``force``
        resumes even when the data, model or training keys changed since the checkpoint."""
        t = self.cfg.train
        self._begin(resume, force)
        s = self.state  # (after a resume: the checkpoint's)
        self._session_start, tokens_at_start, session_steps = time.time(), s.tokens, 0
        bar = tqdm(total=self.total_steps, initial=s.step, desc="train", disable=not self.main, dynamic_ncols=True)
        self._stop_requested = 0
        previous_handlers = self._catch_stop_signals()
        try:
            self.loss_module.train()
            while s.step < self.total_steps and not s.stopped_early:
                batches = self.epoch_order(s.epoch)
                self._use_epoch_items(s.epoch)
                while s.batch < len(batches) and s.step < self.total_steps:
                    record = self._step(batches[s.batch:s.batch + t.grad_accum])
                    if self.threads is not None:
                        record["threads"] = self.threads.after_step()
                    session_steps += 1
                    elapsed = time.time() - self._session_start
                    tok_s = (s.tokens - tokens_at_start) / max(elapsed, 1e-9)
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['train_loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{tok_s:.0f}")
                    if s.step % t.log_every == 0:
                        self._log({**record, "epoch": round(s.epoch + s.batch / len(batches), 4),
                                   "tokens_per_s": round(tok_s, 1), "elapsed_s": round(elapsed, 4)})
                    epoch_done = s.batch >= len(batches)
                    # eval.every counts from the last evaluation, so an epoch-end one is not followed a step or two
                    # later by a periodic one that sees nearly the same weights and costs early-stopping patience
                    every = self.cfg.eval.every
                    periodic = every and s.step - s.last_eval_step >= every
                    if periodic or epoch_done or s.step == self.total_steps:
                        s.last_eval_step = s.step
                        if self._evaluate():
                            break
                    if (t.save_every and s.step % t.save_every == 0) or epoch_done:
                        self._save_checkpoint()
                    stop = self._stop_signal()
                    if stop or (stop_after is not None and session_steps >= stop_after):
                        bar.close()  # at a step boundary: weights, optimizer and loop position agree
                        self._save_checkpoint()
                        raise Interrupted(self.run_dir, s.step, stop or signal.SIGINT)
                if s.batch >= len(batches):  # the next epoch gets its own order
                    s.next_epoch()
        except BaseException:
            self.trackers.close()  # what was logged is flushed; a resumed run continues the same tracker run
            raise
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            if self.threads is not None:
                torch.set_num_threads(self.threads.max_threads)
        bar.close()
        self._save_checkpoint()
        return self._finish(self._wall_s())

    def _finish(self, wall_s: float) -> TrainResult:
        s = self.state
        if self.packing:  # the trained model leaves with the attention it came with
            restore_attention(self.base_model, self.attention_before)
        best = self.run_dir / "best"
        damaged = ckpt.verify(best) if s.best_val is not None and best.exists() else None
        if damaged:  # e.g. a run directory copied in half between two sessions
            log.warning("the best weights in %s are damaged (%s): the run ends with the weights of its last step, %d",
                        best, damaged, s.step)
            s.best_step = s.step  # what the run keeps, as summary.json and the curve's marked point say
        elif s.best_val is not None and best.exists():
            load_trainable_state(self.model, ckpt.load_weights(best))
            log.info("loaded the best weights (validation loss %.4f at step %d)", s.best_val, s.best_step)
        self.accelerator.wait_for_everyone()
        if self.main:
            model = self.accelerator.unwrap_model(self.loss_module).model
            model.save_pretrained(self.run_dir / get_method(self.cfg.method.name).saves)
            summary = {"steps": s.step, "total_steps": self.total_steps, "best_val_loss": s.best_val,
                       "best_step": s.best_step, "eval_metric": self.cfg.eval.metric,
                       "best_metric": s.best_metric, "stopped_early": s.stopped_early, "wall_s": round(wall_s, 2),
                       "trainable_params": self.trainable, "total_params": self.total,
                       "train_examples": len(self.train_set.items), "val_examples": len(self.val_set.items),
                       "dropped_examples": len(self.train_set.dropped) + len(self.val_set.dropped),
                       "partly_truncated": self.train_set.partly_truncated, "train_tokens_seen": s.tokens,
                       "best_weights_damaged": bool(damaged),
                       **({"augmented_per_epoch": [sum(r["replaced"].values()) for r in self.augment_stats]}
                          if self.augment_stats else {})}
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self._log({"step": s.step, "event": "end", **summary})
            from fewtune.plots import plot_loss_curve

            plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
            self.trackers.finish(self.run_dir)
        self.accelerator.wait_for_everyone()
        return TrainResult(self.run_dir, s.step, s.best_val, s.stopped_early, wall_s)


def train(cfg: Config, run_dir: str | Path | None = None, resume: bool | None = None,
          stop_after: int | None = None, force: bool = False) -> TrainResult:
    """Train as configured and write the run directory. The function `fewtune train` calls."""
    resume = cfg.train.resume if resume is None else resume
    trainer = Trainer(cfg, Path(run_dir) if run_dir else None, resume=resume)
    try:
        return trainer.fit(resume=resume, stop_after=stop_after, force=force)
    finally:
        trainer.regularisers.close()  # the embedding hooks (NEFTune, adversarial) leave the model
