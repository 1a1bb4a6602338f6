"""fewtune's decoding loop (fewtune.decode) against transformers' model.generate: the same greedy tokens with
the shared prefix run once and finished rows dropped from the batch."""

import pytest
import torch

from fewtune import decode
from fewtune.config import GenerateSection
from fewtune.data.formats import Message
from fewtune.generate import generate, load_for_inference, prompt_ids

SYSTEM = "Parse the car voice command into JSON with conditions and actions."
COMMANDS = ["打开车窗", "a much longer command than the first one, with words", "play music when I get in",
            "导航到最近的加油站然后播放音乐", "hi", "set the temperature to 22 degrees please"]


@pytest.fixture(scope="module")
def lively(tmp_path_factory, tokenizer) -> dict[str, str]:
    """The tiny models with weights drawn 5x wider: the default draw repeats one token forever, which would
    make any two decoders agree; these write a different token sequence for every prompt."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import _tiny_config

    out = {}
    for arch in ("llama", "qwen2"):
        folder = tmp_path_factory.mktemp(f"lively-{arch}")
        config = _tiny_config(arch, tokenizer)
        config.initializer_range = 0.1
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[arch] = str(folder)
    return out


def _plain(loaded, prompts, max_new_tokens, eos_ids, **sampling):
    """model.generate, one prompt at a time (no padding at all): the reference tokens."""
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        full = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=eos_ids, pad_token_id=loaded.tokenizer.pad_token_id,
                                     **sampling)
        out.append(full[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_tokens_equal_model_generate(lively, arch):
    loaded = load_for_inference(lively[arch], system_prompt=SYSTEM)
    prompts = [prompt_ids(loaded, [Message("user", c)]) for c in COMMANDS]
    n_prefix = decode.common_prefix(prompts)
    assert n_prefix > 10  # the system prompt and the chat markup are shared
    layers = decode.prefix_cache(loaded.model, prompts[0][:n_prefix])
    eos = [loaded.tokenizer.eos_token_id]
    reference = _plain(loaded, prompts, 8, eos)
    ours = decode.decode(loaded.model, prompts, layers, n_prefix, max_new_tokens=8, eos_ids=eos,
                         pad_id=loaded.tokenizer.pad_token_id)
    assert ours == reference and len({tuple(o) for o in ours}) == len(ours)  # and every row says something else
    # without the shared prefix (left padding over whole prompts), and with a repetition penalty
    assert decode.decode(loaded.model, prompts, None, 0, max_new_tokens=8, eos_ids=eos,
                         pad_id=loaded.tokenizer.pad_token_id) == ours
    penalised = _plain(loaded, prompts, 8, eos, repetition_penalty=1.3)
    assert decode.decode(loaded.model, prompts, layers, n_prefix, max_new_tokens=8, eos_ids=eos,
                         pad_id=loaded.tokenizer.pad_token_id, repetition_penalty=1.3) == penalised


def test_a_finished_row_leaves_the_batch_and_the_others_do_not_change(lively):
    loaded = load_for_inference(lively["llama"], system_prompt=SYSTEM)
    prompts = [prompt_ids(loaded, [Message("user", c)]) for c in COMMANDS[:4]]
    n = decode.common_prefix(prompts)
    layers = decode.prefix_cache(loaded.model, prompts[0][:n])
    pad = loaded.tokenizer.pad_token_id
    free = decode.decode(loaded.model, prompts, layers, n, max_new_tokens=6, eos_ids=[], pad_id=pad)
    # the first row's second token as the end of sequence: that row stops after at most 2 tokens
    end = free[0][1]
    rows_seen = []
    hook = loaded.model.register_forward_pre_hook(lambda m, args, kw: rows_seen.append(kw["input_ids"].shape[0]),
                                                  with_kwargs=True)
    try:
        ended = decode.decode(loaded.model, prompts, layers, n, max_new_tokens=6, eos_ids=[end], pad_id=pad)
    finally:
        hook.remove()
    for f, e in zip(free, ended):  # each row up to its first `end`; the rest run on without the finished rows
        assert e == (f[:f.index(end) + 1] if end in f else f)
    assert len(ended[0]) <= 2
    assert rows_seen[0] == 4 and rows_seen[-1] < 4 and len(rows_seen) <= 6


def test_generate_uses_the_loop_and_matches_model_generate_text(lively):
    """Greedy texts equal model.generate's, one prompt at a time, and model.generate is not what ran."""
    loaded = load_for_inference(lively["qwen2"], system_prompt=SYSTEM)
    conversations = [[Message("user", c)] for c in COMMANDS]
    gen = GenerateSection(max_new_tokens=7, batch_size=4)
    real_generate, loaded.model.generate = loaded.model.generate, None  # fewtune's loop, not model.generate
    texts = generate(loaded, conversations, gen, progress=False)
    loaded.model.generate = real_generate
    eos = [loaded.tokenizer.eos_token_id]
    reference = _plain(loaded, [prompt_ids(loaded, c) for c in conversations], 7, eos)
    expected = [loaded.tokenizer.decode(r, skip_special_tokens=False).split(loaded.tokenizer.eos_token)[0].strip()
                for r in reference]
    assert [t[0] for t in texts] == expected


def test_prompt_learning_and_sliding_windows_use_model_generate(tiny_model):
    loaded = load_for_inference(tiny_model)
    assert decode.supported(loaded.model)
    loaded.model.config.layer_types = ["sliding_attention", "full_attention"]
    assert not decode.supported(loaded.model)
