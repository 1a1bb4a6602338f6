"""IA3 and the prompt-learning family, each a peft config built from its config section; peft does the work.

Prompt tuning, P-tuning and prefix tuning train virtual tokens in front of (or, for prefix tuning,
inside the attention of) a frozen model; IA3 learns scaling vectors.
"""

from __future__ import annotations

from fewtune.config import MethodSection
from fewtune.methods import MethodError


def _wrap(model, config):
    from peft import get_peft_model

    return get_peft_model(model, config)


def apply_prompt_tuning(model, method: MethodSection, model_name: str | None = None):
    from peft import PromptTuningConfig, PromptTuningInit

    p = method.prompt
    if p.init_text:
        if model_name is None:
            raise MethodError("method.prompt.init_text needs the tokenizer's path")
        from fewtune.models import resolve_model_path

        tokenizer_path = resolve_model_path(model_name)  # embedded names resolve to their folder
        return _wrap(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p.num_virtual_tokens,
                                               prompt_tuning_init=PromptTuningInit.TEXT,
                                               prompt_tuning_init_text=p.init_text,
                                               tokenizer_name_or_path=tokenizer_path))
    # peft's RANDOM init draws N(0, 1) vectors, far from the scale of real token embeddings;
    # embeddings of sampled vocabulary tokens start where the model's inputs live
    return _wrap(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p.num_virtual_tokens,
                                           prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB))


def apply_p_tuning(model, method: MethodSection, model_name: str | None = None):
    from peft import PromptEncoderConfig

    p = method.prompt
    return _wrap(model, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=p.num_virtual_tokens,
                                            encoder_hidden_size=p.encoder_hidden_size))


def apply_prefix_tuning(model, method: MethodSection, model_name: str | None = None):
    from peft import PrefixTuningConfig

    return _wrap(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.prompt.num_virtual_tokens))


def apply_ia3(model, method: MethodSection, model_name: str | None = None):
    from peft import IA3Config

    ia3 = method.ia3
    extra = {}
    if ia3.target_modules is not None:
        extra["target_modules"] = ia3.target_modules
        # peft requires the feed-forward set to be a subset of the targets
        extra["feedforward_modules"] = ia3.feedforward_modules or []
    elif ia3.feedforward_modules is not None:
        raise MethodError("method.ia3.feedforward_modules needs method.ia3.target_modules too")
    return _wrap(model, IA3Config(task_type="CAUSAL_LM", **extra))
