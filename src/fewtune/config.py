"""The one typed configuration: a section per stage, mirrored key for key by the YAML files.

Unknown or misspelled keys are errors that name the nearest valid key; command-line
overrides use dotted keys (``train.lr=2e-4``) and are parsed as YAML scalars.
"""

from __future__ import annotations

import copy
import difflib
import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fewtune.data.formats import FORMATS
from fewtune.methods import DEFAULT_LR, METHOD_NAMES

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration problem, worded for the user (key path, what is wrong, what to use)."""


class Section(BaseModel):
    """A config section: unknown keys are errors, and assigned values are checked as loaded ones are."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# metrics eval.metric can select (all: higher is better), as fewtune.eval computes them
TASK_METRICS = {
    "classification": ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall"),
    "generation": ("rouge1", "rouge2", "rougeL", "bleu", "exact_match"),
    "json": ("json_valid", "exact_match", "field_f1", "field_precision", "field_recall"),
}


class VisionSection(Section):
    """Vision-language models (Qwen2-VL family): image resolution and what trains besides the language model's
    adapter. The vision tower is frozen by default."""

    train_projector: bool = Field(False, description="Train the projector between vision tower and language model "
                                  "(Qwen2-VL's merger) in full next to the LoRA adapter; saved with the adapter.")
    train_vision_blocks: int = Field(0, ge=0, description="Train the top N blocks of the vision tower in full "
                                     "(0: the vision tower stays frozen).")
    min_pixels: int | None = Field(None, gt=0, description="Qwen2-VL family: smallest image area the processor "
                                   "resizes to; None: the model's own setting.")
    max_pixels: int | None = Field(None, gt=0, description="Qwen2-VL family: largest image area the processor resizes "
                                   "to (fewer pixels, fewer image tokens: faster, less detail); None: the model's own "
                                   "setting. (Idefics3/SmolVLM: their processor's own size settings apply.)")


class ModelSection(Section):
    """The base model and the prompt layout it is trained and prompted with."""

    name: str = Field("smollm2-135m-instruct", description="The base model: an embedded model name, a local "
                      "transformers folder, a .gguf file or a hub id.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype the weights are loaded in; auto: float32 (train.mixed_precision then decides "
        "what the computation runs in).")
    template: Literal["auto", "chat", "plain"] = Field(
        "auto", description="Prompt layout. chat: the tokenizer's chat template; plain: prompt + separator, "
        "completion + stop; auto: chat when the tokenizer has a chat template, else plain.")
    separator: str = Field("\n\n###\n\n", description="Plain template: the text that ends every prompt.")
    stop: str = Field(" END", description="Plain template: the text that ends every completion (generation stops "
                      "there).")
    init_from: str | None = Field(
        None, description="Multi-stage training: a finished run directory this run starts from (e.g. continued "
        "pretraining on domain text before the task). A weight adapter of that run is merged into its base (written "
        "once to RUN_DIR/merged) and this run trains on the merged model; model.name is then that model. The run "
        "directory's lineage.json lists the stages.")
    vision: VisionSection = Field(default_factory=VisionSection, description="Vision-language models: image size "
                                  "and which vision parts train.")


class ReplaySection(Section):
    """Replay against forgetting: general examples mixed into the training split (validation stays task data)."""

    general: str | None = Field(None, description="A general data set mixed into training (as fewtune data mix "
                                "does); None: no replay.")
    ratio: float = Field(1.0, gt=0, description="General examples per training example.")


class CurriculumSection(Section):
    """Curriculum learning: the first epochs ordered from easy to hard."""

    order: Literal["none", "length", "loss"] = Field(
        "none", description="Difficulty: none (the usual shuffled order), length (short first) or loss (low "
        "base-model loss first).")
    buckets: int = Field(4, ge=1, description="Examples are shuffled within each of this many difficulty buckets.")
    epochs: int = Field(1, ge=1, description="Epochs in curriculum order; later epochs are shuffled as usual.")


class ImageAugmentSection(Section):
    """Light label-preserving changes to training images (fewtune.augment.image: the same as `fewtune augment
    --methods image`), drawn afresh each epoch without writing files; never on validation."""

    prob: float = Field(0.0, ge=0.0, le=1.0, description="Chance that an image is changed in an epoch; 0: off.")
    brightness: float = Field(0.15, ge=0, le=0.5, description="Largest relative brightness change.")
    contrast: float = Field(0.15, ge=0, le=0.5, description="Largest relative contrast change.")
    rotate: float = Field(5, ge=0, le=20, description="Largest rotation, degrees.")
    crop: float = Field(0.05, ge=0, le=0.2, description="Largest share cut from each side, resized back (the image "
                        "keeps its size, so its token count does not change).")

    def options(self):
        from fewtune.augment.options import ImageOptions

        return ImageOptions(brightness=self.brightness, contrast=self.contrast, rotate=self.rotate, crop=self.crop)


class AugmentSection(Section):
    """Augmentation during training: cheap, model-free methods applied afresh each epoch to training examples
    (never to validation). LLM-based methods run beforehand with `fewtune augment` and are mixed in with
    `fewtune data mix`."""

    methods: list[str] = Field([], description="Methods applied on the fly (fewtune.augment's table, those marked "
                               "online: eda, noise); []: no augmentation during training.")
    prob: float = Field(0.5, ge=0.0, le=1.0, description="Chance that a training example is replaced by an "
                        "augmentation of it in an epoch (one method, drawn from methods).")
    options: dict[str, dict[str, Any]] = Field({}, description="Per-method options, e.g. {eda: {alpha_sr: 0.1}}; "
                                               "the keys each method takes: fewtune augment --list-methods.")
    images: ImageAugmentSection = Field(default_factory=ImageAugmentSection, description="Image augmentation for "
                                        "examples with images (vision-language models).")
    seed: int | None = Field(None, description="Seed of the augmentations (with the epoch and the example's "
                             "index, so a resumed run sees the same data); None: train.seed.")

    @model_validator(mode="after")
    def _known_methods(self):
        if not self.methods and not self.options:
            return self
        from fewtune.augment.methods import get_method

        for name in {*self.methods, *self.options}:
            method = get_method(name)  # AugmentError (a ValueError) names the known ones
            if name in self.methods and not method.online:
                raise ValueError(f"data.augment.methods: {name!r} needs a model and cannot run each epoch; run "
                                 f"`fewtune augment --methods {name}` first and mix its output in with `fewtune data mix`")
            method.options(**self.options.get(name, {}))
        return self


class DataSection(Section):
    """The training and validation data, how examples are rendered into tokens, and what shapes the training
    data: replay of general examples, curriculum order, augmentation each epoch."""

    train: str | None = Field(None, description="Training data: a JSONL, JSON array or CSV file, or a "
                              "LLaMA-Factory dataset_info.json (with data.dataset).")
    validation: str | None = Field(None, description="A validation file; None: data.val_ratio of the training "
                                   "data is held out.")
    val_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of the training data held out for "
                             "validation when data.validation is not set (stratified by label); 0: no validation.")
    format: Literal[("auto", *FORMATS)] = Field(
        "auto", description="Record format of the data files (the entries of fewtune.data.formats' table); auto: "
        "detected from each file's fields.")
    dataset: str | None = Field(None, description="The data set's name inside a LLaMA-Factory dataset_info.json "
                                "given as data.train.")
    system_prompt: str | None = Field(None, description="System message for examples that have none of their own; "
                                      "None: no system message.")
    max_length: int = Field(512, gt=8, description="Longest rendered example in tokens; longer ones are cut.")
    prompt_loss_weight: float = Field(0.0, ge=0.0, le=1.0, description="Weight of prompt tokens in the loss "
                                      "(0: loss on the completion only, 1: on every token).")
    on_bad_example: Literal["error", "drop"] = Field(
        "error", description="An example with nothing left to learn (its completion cut away or masked): error "
        "stops before training; drop skips it and counts it in summary.json.")
    seed: int = Field(42, description="Seed of the validation split (data.val_ratio) and of the replay mix.")
    replay: ReplaySection = Field(ReplaySection(), description="General data mixed into the training examples.")
    curriculum: CurriculumSection = Field(CurriculumSection(), description="The order of the first epochs, easy "
                                          "to hard.")
    augment: AugmentSection = Field(AugmentSection(), description="Augmentation of the training examples afresh "
                                    "each epoch.")


class LoraSection(Section):
    """lora and qlora: low-rank updates on the target modules, the base weights frozen."""

    r: int = Field(8, gt=0, description="Rank of the low-rank update matrices.")
    alpha: float = Field(16.0, description="Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) "
                         "with use_rslora).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout probability on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules that get an adapter: module names, or all-linear (every linear layer "
        "but the output layer).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): magnitude and direction trained "
                           "apart.")
    use_rslora: bool = Field(False, description="Scale by alpha / sqrt(r) instead of alpha / r: stable at higher "
                             "ranks.")


class PromptSection(Section):
    """prompt_tuning, p_tuning and prefix_tuning: trained virtual tokens, the model frozen."""

    num_virtual_tokens: int = Field(20, gt=0, description="Number of trained virtual tokens (per layer for "
                                    "prefix_tuning).")
    init_text: str | None = Field(None, description="prompt_tuning: start the virtual tokens from this text's "
                                  "embeddings; None: from sampled vocabulary embeddings.")
    encoder_hidden_size: int = Field(128, gt=0, description="p_tuning: width of the prompt encoder's MLP.")


class IA3Section(Section):
    """ia3: trained scaling vectors on the target modules' activations."""

    target_modules: list[str] | None = Field(None, description="Modules whose activations are scaled; None: "
                                             "peft's defaults for the architecture.")
    feedforward_modules: list[str] | None = Field(
        None, description="Those of target_modules scaled on their input (feed-forward layers); None: peft's "
        "defaults (needs target_modules when set).")


class QLoraSection(Section):
    """qlora: the base loaded in 4 bits (bitsandbytes, CUDA only), a LoRA adapter (method.lora) on top."""

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base weights.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves about 0.4 bits "
                               "per weight).")


class FullSection(Section):
    """full: every weight trained, except what these keys freeze."""

    freeze_embeddings: bool = Field(False, description="Keep the input embeddings frozen.")
    train_top_layers: int | None = Field(None, ge=0, description="Train only the top N transformer blocks; None: "
                                         "all of them.")
    freeze_patterns: list[str] = Field([], description="Regular expressions; parameters whose names match one are "
                                       "frozen.")


class MethodSection(Section):
    """What is trained: the method and each method's own settings."""

    name: Literal[METHOD_NAMES] = Field("lora", description="The fine-tuning method (the entries of "
                                        "fewtune.methods.METHODS).")
    lora: LoraSection = Field(LoraSection(), description="Settings of lora and qlora.")
    full: FullSection = Field(FullSection(), description="Settings of full fine-tuning.")
    prompt: PromptSection = Field(PromptSection(), description="Settings of the prompt-learning methods.")
    ia3: IA3Section = Field(IA3Section(), description="Settings of ia3.")
    qlora: QLoraSection = Field(QLoraSection(), description="Quantization settings of qlora.")


class TrainSection(Section):
    """The training loop: length, batches, optimizer and schedule, checkpoints, precision."""

    output_dir: str = Field("runs/run", description="The run directory written.")
    epochs: float = Field(3.0, gt=0, description="Passes over the training data (fractions allowed); "
                          "train.max_steps overrides it.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to train; None: from train.epochs.")
    batch_size: int = Field(8, gt=0, description="Examples per micro-batch on each process (also the batch of "
                            "validation and of in-training evaluation).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated into one optimizer step.")
    group_by_length: bool = Field(True, description="Batches of similar length: less padding, the same examples "
                                  "per epoch.")
    lr: float | None = Field(None, gt=0, description="Peak learning rate; None: the method's own default "
                             "(fewtune.methods: 1e-4 LoRA/QLoRA, 1e-5 full, 3e-3 IA3, 1e-2 prompt methods).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient's global L2 norm to this; None: "
                                        "no clipping.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of the steps the learning rate warms up "
                                "linearly from 0.")
    scheduler: Literal["linear", "cosine", "cosine_with_restarts", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup.")
    num_cycles: int = Field(2, ge=1, description="cosine_with_restarts: number of cosine cycles.")
    save_every: int | None = Field(None, gt=0, description="Write a checkpoint every this many steps; one is also "
                                   "written at each epoch end. None: at epoch ends only.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept in checkpoints/; older ones are "
                                  "deleted.")
    keep_best: int = Field(3, ge=1, description="The trainable weights of this many best evaluations (ranked as "
                           "eval.metric picks the best) kept in best-ranked/, for `fewtune export RUN --average "
                           "best:K`; best/ holds the single best either way. Each copy is the size of the trainable "
                           "weights (a few MB for LoRA; the whole model for full fine-tuning: set 1 there to save "
                           "disk).")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that have it (else fp16 with loss scaling); on CPU bf16 only if the "
        "run's own training steps, timed in both, run faster in it (cached per machine and model), else float32. "
        "no: float32. FEWTUNE_MIXED_PRECISION=no|bf16|fp16 forces what auto picks.")
    packing: bool = Field(True, description="A micro-batch is one row without padding; attention stays inside each "
                          "example.")
    share_prefix: bool = Field(True, description="With packing: a token prefix common to a micro-batch is computed "
                               "once.")
    loss_chunk_size: int | None = Field(None, gt=0, description="Positions per output-layer chunk in the loss; "
                                        "None: about 128 MB of logits per chunk.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less "
                                         "memory, one more forward.")
    num_threads: int | None = Field(None, gt=0, description="CPU threads per process; None: the available cores "
                                    "divided by the processes.")
    adapt_threads: bool = Field(True, description="On a CPU with num_threads unset: train on fewer threads while "
                                "other processes use part of the cores (measured every 5 s), all of them again once "
                                "they stop. Without it a second busy process slows training several times over.")
    cache_tokenized: bool = Field(True, description="Keep rendered token ids on disk for resumes and sweeps.")
    seed: int = Field(42, description="Seed of the weights' initialisation, the data order and dropout.")
    resume: bool = Field(False, description="Continue the run in train.output_dir from its newest intact "
                         "checkpoint.")
    force_resume: bool = Field(False, description="Resume even if the data, model or training keys changed since "
                               "the checkpoint.")
    log_every: int = Field(1, gt=0, description="Write a training record to metrics.jsonl every this many steps.")
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        [], description="Experiment trackers that also receive the config, every logged record and, at the end, "
        "the loss plot and summary (through accelerate's trackers; offline: TensorBoard event files, an MLflow "
        "SQLite store). Needs `pip install tensorboardX` / `pip install mlflow-skinny`.")
    tracking_dir: str | None = Field(None, description="Where trackers write; None: TRAIN.OUTPUT_DIR/tracking. "
                                     "sweep and tune point every run of theirs at one folder.")
    experiment: str = Field("fewtune", description="The tracker's experiment (MLflow) or group folder (TensorBoard) "
                            "the run is filed under; sweep and tune use their own name for all their runs.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        # YAML 1.1 reads a bare `no` (train.mixed_precision=no on the command line) as false
        return "no" if value is False else value

    def resolved_lr(self, method: str) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(method, 1e-4)


class AdversarialSection(Section):
    """Adversarial training on the embedding layer's output (FGM: one step; PGD: K projected steps)."""

    kind: Literal["none", "fgm", "pgd"] = Field("none", description="none: off; fgm: one step; pgd: "
                                                "regularise.adversarial.steps projected steps.")
    epsilon: float = Field(1.0, gt=0, description="Largest perturbation per example (L2 norm of its embedding "
                           "change).")
    alpha: float = Field(0.3, gt=0, description="PGD: the step size of each step.")
    steps: int = Field(3, ge=1, description="PGD: the number of steps K.")


class EwcSection(Section):
    """Elastic weight consolidation: a penalty on moving the weights the general data depends on."""

    general: str | None = Field(None, description="General data the Fisher information is estimated on.")
    weight: float = Field(0.0, ge=0, description="Penalty weight lambda; 0 turns EWC off.")
    samples: int = Field(64, gt=0, description="General examples used for the Fisher estimate (a seeded sample).")


class RegulariseSection(Section):
    """Regularisers against overfitting a small data set and forgetting, on the loss, the embeddings or the weights
    (all off by default)."""

    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing on completion tokens, training "
                                   "loss only (the validation loss stays plain).")
    neftune_alpha: float = Field(0.0, ge=0, description="NEFTune noise on the embeddings while training (the "
                                 "paper uses 5); 0: off.")
    adversarial: AdversarialSection = Field(AdversarialSection(), description="Adversarial training (FGM/PGD).")
    ewc: EwcSection = Field(EwcSection(), description="Elastic weight consolidation.")


class EarlyStoppingSection(Section):
    """Stop training when the validation figure (loss or task metric) stops improving."""

    enabled: bool = Field(True, description="Stop early; with false every evaluation still picks the best "
                          "checkpoint.")
    patience: int = Field(3, ge=1, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change that counts as an improvement (in the "
                             "units of the figure watched).")


EVAL_TASKS = ("classification", "generation", "json", "perplexity")


class EvalSection(Section):
    """Evaluation: `fewtune eval` and `compare`, pseudo-label's scoring, and the evaluations during training."""

    task: Literal[EVAL_TASKS] | None = Field(
        None, description="classification, generation, json or perplexity. None (or auto): fewtune eval and "
        "compare detect it from the data; during training only the validation loss is computed (perplexity "
        "likewise).")
    labels: list[str] | None = Field(None, description="Classification: the candidate labels; None: the labels "
                                     "found in the data.")
    mode: Literal["choice", "generate"] = Field(
        "choice", description="Classification: score each label (choice), or generate and map the output to a "
        "label.")
    normalize: bool = Field(False, description="Choice scoring: rank the labels by mean log-probability per token "
                            "instead of the sum.")
    limit: int | None = Field(None, gt=0, description="fewtune eval and compare: only the first N examples (of "
                              "a .txt file: windows); None: all of them.")
    batch_size: int = Field(8, gt=0, description="Examples scored or generated together by fewtune eval, compare "
                            "and pseudo-label (evaluation during training uses train.batch_size).")
    max_new_tokens: int | None = Field(None, gt=0, description="Tokens generated per example; None: the run's "
                                       "generate.max_new_tokens (classification: the longest label's + 16).")
    window: int = Field(256, gt=0, description="Perplexity of a .txt file: tokens per window.")
    format: Literal[("auto", *FORMATS)] = Field(
        "auto", description="Record format of the evaluation file; auto: detected from its fields.")
    system_prompt: str | None = Field(
        None, description="System prompt for a model without a run's template (a run directory keeps its own); "
        "None: none (compare: the first run directory's).")
    precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="What fewtune eval, compare and pseudo-label compute in. auto: a run's training "
        "precision (fp32 where bf16 is far slower on this CPU); another model's by timed forward passes on a CPU, "
        "bf16 on a GPU that has it. no: float32. FEWTUNE_MIXED_PRECISION forces auto as for training.")
    shots: int = Field(0, ge=0, description="fewtune eval, compare and baseline: this many solved examples (from "
                       "eval.shots_from) before every query, as earlier user/assistant turns in the model's template; "
                       "classification: stratified by label. 0: zero-shot.")
    shots_from: str | None = Field(None, description="The file the shots are drawn from (never an evaluated "
                                   "input); None: the run's data.train.")
    shots_seed: int = Field(0, description="Seed of the shots' draw.")
    prompt_file: str | None = Field(None, description="A file whose text is the system prompt (a role and "
                                    "instructions written by the user); replaces a run's own, like system_prompt.")
    general: str | None = Field(None, description="compare: a general-ability set (.txt or data file) whose "
                                "perplexity shows forgetting; None: not measured.")
    general_limit: int | None = Field(200, gt=0, description="compare: windows or examples of eval.general used; "
                                      "None: all of them.")
    n_resamples: int = Field(1000, gt=0, description="compare: bootstrap resamples behind the 95% intervals.")
    show: int = Field(20, ge=0, description="compare: disagreeing examples listed per pair in compare.json.")
    every: int | None = Field(None, gt=0, description="Training: evaluate every this many steps since the last "
                              "evaluation; one also runs at each epoch end. None: at epoch ends only.")
    metric: str = Field("loss", description="Training: picks the best checkpoint and drives early stopping: loss, "
                        "or a metric of eval.task (higher is better; ties go to the lower loss).")
    sample: int | None = Field(None, gt=0, description="Training: compute the task metric on this many validation "
                               "examples (a seeded sample); None: all of them.")
    early_stopping: EarlyStoppingSection = Field(EarlyStoppingSection(), description="Training: early stopping on "
                                                 "the validation figure eval.metric names.")

    @field_validator("precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false

    @field_validator("task", mode="before")
    @classmethod
    def _auto_task(cls, value):
        if value == "auto":  # the command-line spelling of "detect it"
            return None
        if value is not None and value not in EVAL_TASKS:
            raise ValueError(f"unknown task {value!r}: use one of auto, {', '.join(EVAL_TASKS)}")
        return value

    @model_validator(mode="after")
    def _check_metric(self) -> "EvalSection":
        if self.metric == "loss":
            return self
        if self.task not in TASK_METRICS:
            raise ValueError(f"eval.metric '{self.metric}' needs eval.task (classification, generation or json)")
        if self.metric not in TASK_METRICS[self.task]:
            raise ValueError(f"eval.metric '{self.metric}' is not a {self.task} metric; "
                             f"use loss or one of {', '.join(TASK_METRICS[self.task])}")
        return self


class GenerateSection(Section):
    """Sampling settings of fewtune generate and chat (and of evaluation, greedy there)."""

    max_new_tokens: int = Field(128, gt=0, description="Most tokens generated per output.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0: greedy decoding.")
    top_k: int | None = Field(None, gt=0, description="Sample from the k most likely tokens only; None: no limit.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling: the smallest set of tokens with "
                                "this total probability; None: no limit.")
    repetition_penalty: float = Field(1.0, gt=0, description="Penalty on tokens already present (1: none).")
    stop: list[str] = Field([], description="Extra stop strings, cut from the output.")
    num_return_sequences: int = Field(1, gt=0, description="Outputs per prompt.")
    seed: int = Field(0, description="Seed of sampling.")
    batch_size: int = Field(16, gt=0, description="Prompts generated together.")
    precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="What fewtune generate and chat compute in; as eval.precision.")

    @field_validator("precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false


class Config(Section):
    """The whole configuration: one section per stage."""

    model: ModelSection = Field(ModelSection(), description="The base model and its prompt layout.")
    data: DataSection = Field(DataSection(), description="Training and validation data.")
    method: MethodSection = Field(MethodSection(), description="The fine-tuning method.")
    train: TrainSection = Field(TrainSection(), description="The training loop.")
    regularise: RegulariseSection = Field(RegulariseSection(), description="Regularisers.")
    eval: EvalSection = Field(EvalSection(), description="Evaluation, during training and after it.")
    generate: GenerateSection = Field(GenerateSection(), description="Generation settings.")

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.method.name == "full" and self.method.lora != LoraSection():
            pass  # harmless: lora settings are ignored for full fine-tuning
        ewc = self.regularise.ewc
        if ewc.weight > 0 and not ewc.general:
            raise ValueError("regularise.ewc.weight > 0 needs regularise.ewc.general (a general data file)")
        return self


def section_class(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _fields_at(path: tuple[Any, ...]) -> list[str]:
    """Valid keys of the section at a key path (for 'did you mean')."""
    cls: type[BaseModel] = Config
    for part in path:
        field = cls.model_fields.get(str(part))
        sub = section_class(field.annotation) if field is not None else None
        if sub is None:
            return []
        cls = sub
    return list(cls.model_fields)


def schema_paths(cls: type[BaseModel] | None = None, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of the schema, sections and leaves: ('train',), ('train', 'lr'), ..."""
    out = []
    for name, field in (cls or Config).model_fields.items():
        path = (*prefix, name)
        out.append(path)
        sub = section_class(field.annotation)
        if sub is not None:
            out += schema_paths(sub, path)
    return out


def _ranked(candidates: list[tuple[str, ...]], parent: tuple[str, ...]) -> list[str]:
    """Candidate key paths, those sharing the most of the given key's sections first, then the shortest."""
    def shared(path: tuple[str, ...]) -> int:
        n = 0
        for a, b in zip(path, parent):
            if a != b:
                break
            n += 1
        return n

    return [".".join(p) for p in sorted(candidates, key=lambda p: (-shared(p), len(p), p))]


def _did_you_mean(paths: list[str]) -> str:
    also = f" (or {', '.join(repr(p) for p in paths[1:3])})" if len(paths) > 1 else ""
    return f"did you mean '{paths[0]}'?{also}"


def suggest_key(loc: tuple[Any, ...]) -> str:
    """The hint for an unknown key: the same key in another section, a near spelling here, or the valid keys."""
    parent, name = tuple(str(p) for p in loc[:-1]), str(loc[-1])
    everywhere = schema_paths()
    elsewhere = [p for p in everywhere if p[-1] == name and p[:-1] != parent]
    if elsewhere:  # a key put in the wrong section (method.r, train.label_smoothing, lr at the top level)
        return _did_you_mean(_ranked(elsewhere, parent))
    valid = _fields_at(parent)
    here = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    there = difflib.get_close_matches(name, sorted({p[-1] for p in everywhere} - set(valid)), n=1, cutoff=0.75)
    ratio = lambda other: difflib.SequenceMatcher(None, name, other).ratio()  # noqa: E731
    if there and (not here or ratio(there[0]) > ratio(here[0]) + 0.1):  # misspelt and in the wrong section
        return _did_you_mean(_ranked([p for p in everywhere if p[-1] == there[0]], parent))
    if here:  # a misspelling in the right section
        return _did_you_mean([".".join([*parent, here[0]])])
    return f"valid keys{' in ' + '.'.join(parent) if parent else ''}: {', '.join(valid)}"


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _key_of(loc: tuple[Any, ...]) -> str:
    """The user's key path of an error location: schema keys, list positions as [i]; pydantic's union tags dropped."""
    known, parts, key = set(schema_paths()), [], ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif (*parts, str(part)) in known or not parts or (*parts,) not in known:
            parts.append(str(part))
            key += ("." if len(parts) > 1 else "") + str(part)
    return key


def _explain(err: ValidationError, source: str) -> ConfigError:
    problems: dict[str, list[str]] = {}  # key -> what is wrong (a union's members each say what they take)
    got: dict[str, Any] = {}
    for e in err.errors():
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            problems.setdefault(f"unknown key '{'.'.join(map(str, loc))}': {suggest_key(loc)}", [])
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "value_error" and isinstance(e.get("input"), dict):  # a section's check across keys
            problems.setdefault(msg, [])  # worded with the key paths it is about
            continue
        key = _key_of(loc)
        whats = problems.setdefault(f"'{key}'", [])
        if msg not in whats:
            whats.append(msg if not whats else msg.removeprefix("Input should be "))
        got[f"'{key}'"] = e.get("input")
    lines = [f"{head}: {' or '.join(whats)} (got {_short_repr(got[head])})" if whats else head
             for head, whats in problems.items()]
    return ConfigError(f"invalid configuration in {source}: " + "; ".join(lines))


# ---------------------------------------------------------------- keys that moved

# old key path -> new one (a key under a moved section moves with it). Configs written before the move (a run
# directory's config.yaml, which `train --resume`, `generate` and `eval` read) still load: each old key is read
# at its new place, with one warning naming the new keys.
MOVED_KEYS = {
    "train.eval_every": "eval.every",
    "train.eval_task": "eval.task",
    "train.eval_mode": "eval.mode",
    "train.eval_metric": "eval.metric",
    "train.eval_sample": "eval.sample",
    "train.early_stopping": "eval.early_stopping",
    "regularise.replay": "data.replay",
    "regularise.curriculum": "data.curriculum",
}


def dotted_keys(tree: dict, prefix: str = "") -> dict[str, object]:
    """A nested config mapping as dotted keys, in order: {'train': {'lr': 5e-4}} -> {'train.lr': 5e-4}."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def moved_key(key: str) -> str | None:
    """The new dotted key path of a key that moved (``train.early_stopping.patience`` ->
    ``eval.early_stopping.patience``), or None."""
    for old, new in MOVED_KEYS.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return None


def _leaves(value: Any, path: str) -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        return [leaf for key, sub in value.items() for leaf in _leaves(sub, f"{path}.{key}")]
    return [(path, value)]


def move_keys(data: dict, source: str = "<config>") -> dict:
    """A nested config mapping with every moved key at its new place (in place; one warning for all of them).

    An old key and its new one both set to different values is an error: which one was meant is not known."""
    moved = []
    for old in MOVED_KEYS:
        *parents, name = old.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or name not in node:
            continue
        moved.append(f"{old} -> {MOVED_KEYS[old]}")
        for old_leaf, value in _leaves(node.pop(name), old):
            new_leaf = moved_key(old_leaf)
            *new_parents, new_name = new_leaf.split(".")
            target: Any = data
            for part in new_parents:
                target = target.setdefault(part, {}) if isinstance(target, dict) else None
            if not isinstance(target, dict) or (value == {} and isinstance(target.get(new_name), dict)):
                continue  # a scalar where a section belongs (validation names it), or an empty old section
            if new_name in target and target[new_name] != value:
                raise ConfigError(f"{source}: both '{old_leaf}' ({_short_repr(value)}) and '{new_leaf}' "
                                  f"({_short_repr(target[new_name])}) are set; '{old}' has moved to "
                                  f"'{MOVED_KEYS[old]}': keep only '{new_leaf}'")
            target[new_name] = value
    if moved:
        log.warning("%s: %s moved; read at the new place%s (%s)", source, "keys have" if len(moved) > 1 else "a key has",
                    "s" if len(moved) > 1 else "", "; ".join(moved))
    return data


def _move_override(item: str, source: str) -> str:
    key, sep, value = item.partition("=")
    new = moved_key(key.strip()) if sep else None
    if new is None:
        return item
    log.warning("%s: override '%s': '%s' has moved to '%s'; read there", source, item, key.strip(), new)
    return f"{new}={value}"


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[path[-1]] = value
    return data


def build_config(data: dict | None = None, overrides: list[str] | None = None, source: str = "<config>") -> Config:
    """The checked config from a nested mapping (as YAML reads it) and dotted overrides on top; moved keys
    (MOVED_KEYS) are read at their new places first. ``data`` is not modified."""
    data = move_keys(copy.deepcopy(dict(data or {})), source)
    data = apply_overrides(data, [_move_override(item, source) for item in overrides or []])
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise _explain(err, source) from None


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own message spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    what = getattr(err, "problem", None) or " ".join(str(err).split())
    context = getattr(err, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{what}{where}" + (f" ({context})" if context else "")


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if path.is_dir():
        hint = f" (the run's config is {path / 'config.yaml'})" if (path / "config.yaml").is_file() else ""
        raise ConfigError(f"{path} is a directory, not a config file{hint}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}): "
                          "is it a config file?") from None
    except OSError as err:
        raise ConfigError(f"{path} cannot be read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections ({', '.join(Config.model_fields)})")
    cfg = build_config(data, overrides, source=str(path))
    # relative data paths are relative to the config file, as a user reading it expects
    for key in ("train", "validation"):
        value = getattr(cfg.data, key)
        if value and not Path(value).is_absolute() and not Path(value).exists():
            candidate = path.parent / value
            if candidate.exists():
                setattr(cfg.data, key, str(candidate))
    for section in (cfg.data.replay, cfg.regularise.ewc, cfg.eval):
        if section.general and not Path(section.general).is_absolute() and not Path(section.general).exists():
            if (path.parent / section.general).exists():
                section.general = str(path.parent / section.general)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True), encoding="utf-8")
