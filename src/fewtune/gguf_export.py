"""A run (merged) or model as one GGUF file for llama.cpp, Ollama and other GGUF runtimes.

Written with the ``gguf`` package's writer and quantizers (pure Python and NumPy): F32, F16, BF16,
Q8_0 and Q4_0. K-quants (Q4_K_M and friends) need llama.cpp's compiled ``llama-quantize``; run it on
the F16 file this writes. Architectures: the Llama family (Llama, SmolLM, Mistral-style configs:
``llama``) and Qwen2 (``qwen2``), the two transformers and llama.cpp read the same way here.

What goes in besides the weights:

- the tokenizer: the vocabulary in id order, its merges and token types (control tokens marked), the
  BOS/EOS/padding ids; a model whose config has more rows than the tokenizer has tokens gets
  ``[PAD<id>]`` names for the rest, as llama.cpp's converter does;
- the chat template the run was trained with. A model answers worse when the runtime prompts it
  differently from training, and a GGUF runtime only knows the Jinja template in the file: so the
  run's system prompt, which fewtune adds to a conversation that has none, is written into the
  template as its default system message; ``fewtune.template`` keeps template.json as it is;
- llama-family query and key weights are stored in llama.cpp's rotary layout (the two halves of
  every head interleaved), which GGUF readers, transformers included, undo on loading.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}
# a block-quantized tensor needs its rows to be a whole number of blocks (32 values for Q8_0/Q4_0)


class GGUFExportError(ValueError):
    """A model or option this exporter cannot write, worded for the user."""


@dataclass
class GGUFReport:
    path: Path
    quant: str
    bytes: int
    tensors: int
    seconds: float
    kept_f32: list[str]  # tensors left in F32/F16 because the quantization cannot hold them

    def to_dict(self) -> dict:
        return {"path": str(self.path), "quant": self.quant, "bytes": self.bytes, "tensors": self.tensors,
                "seconds": round(self.seconds, 2), "kept_unquantized": self.kept_f32}


def _qtype(quant: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
            "q4_0": gguf.GGMLQuantizationType.Q4_0}[quant]


def _file_type(quant: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]


def rotary_interleave(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a query/key projection from transformers' rotary layout (each head: first half, second half)
    to llama.cpp's (pairs side by side). transformers' GGUF reader applies the inverse."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def chat_template_for_gguf(template, tokenizer) -> str | None:
    """The Jinja template a GGUF runtime should apply: the run's, with its system prompt as the default
    system message; for a plain (separator/stop) run, the same layout written in Jinja."""
    if template.kind == "plain":
        sep, stop = json.dumps(template.separator), json.dumps(template.stop)
        system = json.dumps(template.system_prompt) if template.system_prompt else None
        return ("{%- for message in messages -%}"
                "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
                "{%- elif message['role'] == 'user' -%}"
                + (f"{{%- if loop.first -%}}{{{{ {system} + '\\n\\n' }}}}{{%- endif -%}}" if system else "")
                + f"{{{{ message['content'] + {sep} }}}}"
                f"{{%- else -%}}{{{{ message['content'] + {stop} }}}}{{%- endif -%}}"
                "{%- endfor -%}")
    chat = template.chat_template or getattr(tokenizer, "chat_template", None)
    if not chat or not template.system_prompt:
        return chat
    default = json.dumps(template.system_prompt, ensure_ascii=False)
    return ("{%- if messages and messages[0]['role'] != 'system' -%}"
            f"{{%- set messages = [{{'role': 'system', 'content': {default}}}] + messages -%}}"
            "{%- endif -%}" + chat)


LLAMA3_SPLIT_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


def pre_tokenizer_name(backend: dict, model_type: str) -> str:
    """llama.cpp's name for how the text is split before the merges (``tokenizer.ggml.pre``): the runtime picks
    its split rules by it. Qwen2's, Llama 3's, SmolLM's (digits one by one), else llama.cpp's default."""
    if model_type == "qwen2":
        return "qwen2"
    pre = json.dumps(backend.get("pre_tokenizer") or {})
    if LLAMA3_SPLIT_START in pre:
        return "llama-bpe"
    if '"Digits"' in pre and '"individual_digits": true' in pre:
        return "smollm"
    return "default"


def _tokenizer_metadata(writer, tokenizer, vocab_rows: int, model_type: str) -> None:
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(f"the tokenizer is {model.get('type')}, not byte-level BPE: this exporter writes "
                              "GPT-2-style (byte-level BPE) vocabularies only (SmolLM, Qwen2, Llama 3)")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_rows:
        raise GGUFExportError(f"the tokenizer has {len(vocab)} tokens and the model {vocab_rows} embedding rows")
    by_id = {i: t for t, i in vocab.items()}
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    added = {t.content for t in tokenizer.added_tokens_decoder.values() if not t.special}
    tokens, types = [], []
    for i in range(vocab_rows):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if token in special else
                         gguf.TokenType.USER_DEFINED if token in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(backend, model_type))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)


def write_gguf(model, tokenizer, template, out_file: str | Path, quant: str = "f16", name: str = "model",
               extra: dict[str, str] | None = None) -> GGUFReport:
    """Write a (merged, plain transformers) causal LM, its tokenizer and template as a GGUF file."""
    import gguf

    if quant not in QUANTS:
        raise GGUFExportError(f"--quant {quant}: this exporter writes {', '.join(QUANTS)}; for K-quants (q4_k_m...) "
                              "run llama.cpp's llama-quantize on the f16 file")
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise GGUFExportError(f"a {model_type} model cannot be written as GGUF here: supported are "
                              f"{', '.join(sorted(ARCHITECTURES))} (the Llama family and Qwen2)")
    if getattr(config, "rope_scaling", None) and (config.rope_scaling or {}).get("rope_type", "default") != "default":
        raise GGUFExportError(f"rope scaling {config.rope_scaling} is not written by this exporter")
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[model_type])
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    out_file = Path(out_file)
    if out_file.suffix.lower() != ".gguf":
        raise GGUFExportError(f"--gguf {out_file}: name the file *.gguf")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    tmp = out_file.with_name(out_file.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch_name)
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(kv_heads))
    writer.add_rope_dimension_count(int(head_dim))
    rope_theta = getattr(config, "rope_theta", None)
    if rope_theta is None:
        rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(_file_type(quant))
    _tokenizer_metadata(writer, tokenizer, int(config.vocab_size), model_type)
    chat = chat_template_for_gguf(template, tokenizer)
    if chat:
        writer.add_chat_template(chat)
    writer.add_string("fewtune.template", json.dumps(template.__dict__, ensure_ascii=False))
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    qtype = _qtype(quant)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    kept: list[str] = []
    state = model.state_dict()
    count = 0
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue  # a GGUF without output.weight is read as tied
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"no GGUF name for {hf_name}: this {model_type} model has a tensor the exporter "
                                  "does not know")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if gguf_name.endswith("attn_q.weight") and arch_name == "llama":
            data = rotary_interleave(data, heads)
        elif gguf_name.endswith("attn_k.weight") and arch_name == "llama":
            data = rotary_interleave(data, kv_heads)
        if data.ndim == 1 or quant == "f32":  # norms and biases stay F32, as llama.cpp keeps them
            writer.add_tensor(gguf_name, data.astype(np.float32))
        elif quant in ("q8_0", "q4_0") and data.shape[-1] % block:
            kept.append(gguf_name)
            writer.add_tensor(gguf_name, data.astype(np.float16))
        elif quant == "f16":
            writer.add_tensor(gguf_name, data.astype(np.float16))
        else:
            packed = gguf.quants.quantize(data, qtype)
            writer.add_tensor(gguf_name, packed, raw_dtype=qtype)
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    tmp.replace(out_file)
    return GGUFReport(out_file, quant, out_file.stat().st_size, count, time.time() - start, kept)


def export_gguf(source: str | Path, out_file: str | Path, quant: str = "f16", loaded=None) -> GGUFReport:
    """A run directory (its adapter merged) or a model folder as a GGUF file; reports what was written."""
    from fewtune.generate import load_for_inference

    loaded = loaded or load_for_inference(str(source), merge=True, precision="no")
    from fewtune.methods import check_mergeable

    check_mergeable(loaded.model)
    model = loaded.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    name = Path(str(source).rstrip("/")).name
    report = write_gguf(model, loaded.tokenizer, loaded.template, out_file, quant, name=name,
                        extra={"fewtune.source": str(source)})
    log.info("GGUF written to %s (%s, %.1f MB)", report.path, quant, report.bytes / 2**20)
    return report


# ---------------------------------------------------------------- checking a written file


def check_gguf(source: str | Path, gguf_file: str | Path, data: str | Path, limit: int = 20,
               max_new_tokens: int = 32, progress: bool = False, merged=None) -> dict:
    """Reload the GGUF (transformers dequantizes it) and compare it with the merged source on the first ``limit``
    prompts of ``data``: the prompt tokens each renders (template and tokenizer), greedy outputs, and the top
    token at every position of the source's greedy continuation (teacher-forced); plus file sizes and CPU
    tokens/s of llama.cpp on the file when llama-cpp-python is installed (transformers runs a dequantized
    copy, whose speed says nothing about the format)."""
    from fewtune.data.formats import load_examples
    from fewtune.generate import check_prompts, load_for_inference

    examples = load_examples(data)[:limit]
    if not examples:
        raise GGUFExportError(f"{data} has no examples to check the GGUF file on")
    conversations = [e.prompt_messages for e in examples]
    merged = merged or load_for_inference(str(source), merge=True, precision="no")
    gguf_loaded = load_for_inference(str(gguf_file), precision="no")
    ids_a = check_prompts(merged, conversations, max_new_tokens)
    ids_b = check_prompts(gguf_loaded, conversations, max_new_tokens)

    def greedy(loaded, prompt: list[int]) -> list[int]:
        out = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=loaded.tokenizer.pad_token_id or loaded.tokenizer.eos_token_id)
        return out[0, len(prompt):].tolist()

    agree = total = same = 0
    with torch.no_grad():
        for prompt in ids_a:  # the same tokens into both: the weights are compared
            cont_a, cont_b = greedy(merged, prompt), greedy(gguf_loaded, prompt)
            same += cont_a == cont_b
            full = torch.tensor([prompt + cont_a])
            a = merged.model(full).logits[0, len(prompt) - 1:-1].argmax(-1)
            b = gguf_loaded.model(full).logits[0, len(prompt) - 1:-1].argmax(-1)
            agree += int((a == b).sum())
            total += len(a)
    return {"examples": len(examples), "same_prompt_tokens": sum(a == b for a, b in zip(ids_a, ids_b)),
            "same_greedy_output": same, "top_token_agreement": agree / total if total else None,
            "positions": total, "gguf_bytes": Path(gguf_file).stat().st_size,
            "fp32_bytes": sum(p.numel() * 4 for p in merged.model.parameters()),
            "fp32_tokens_per_s": _fp32_speed(merged, ids_a[:SPEED_PROMPTS], max_new_tokens),
            "llama_cpp_tokens_per_s": _llama_cpp_speed(gguf_file, ids_a[:SPEED_PROMPTS], max_new_tokens)}


SPEED_PROMPTS = 5  # prompts the speeds are measured on (one 32-token generation alone varies by +-20%)


@torch.no_grad()
def _fp32_speed(merged, prompts: list[list[int]], n: int) -> float:
    """Tokens/s of greedy generation by the merged fp32 model (transformers), one prompt at a time: what the
    GGUF's llama.cpp speed is compared with (the same prompts and token counts, prefill included in both)."""
    produced, start = 0, time.time()
    for prompt in prompts:
        out = merged.model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    pad_token_id=merged.tokenizer.pad_token_id or merged.tokenizer.eos_token_id)
        produced += out.shape[1] - len(prompt)
    return produced / (time.time() - start)


def _llama_cpp_speed(gguf_file, prompts: list[list[int]], n: int) -> float | None:
    try:
        from llama_cpp import Llama  # type: ignore[import-not-found]
    except ImportError:
        return None
    threads = torch.get_num_threads()  # as many as the fp32 side uses (llama-cpp-python's default is half the cores)
    llm = Llama(model_path=str(gguf_file), n_ctx=max(512, max(map(len, prompts)) + n + 8), n_threads=threads,
                n_threads_batch=threads, verbose=False)
    produced, start = 0, time.time()
    for prompt in prompts:
        llm.reset()  # no cache carried from the previous prompt: each prefill is paid, as on the fp32 side
        for i, _ in enumerate(llm.generate(prompt, temp=0.0, reset=True), 1):  # n tokens, end-of-sequence or not
            if i >= n:
                break
        produced += n
    return produced / (time.time() - start)
