"""Merging a LoRA run into its base weights (W + BA) and saving a plain transformers model."""

from __future__ import annotations

import logging
from pathlib import Path

from fewtune.generate import check_run_dir, load_for_inference, looks_like_run_dir

log = logging.getLogger(__name__)


def export_merged(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a folder that `AutoModelForCausalLM.from_pretrained` loads with no peft installed.

    The tokenizer (with the chat template) and template.json go along, so `fewtune generate
    OUT_DIR` prompts the merged model exactly as the run was trained.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not looks_like_run_dir(run_dir):
        what = "does not exist" if not run_dir.exists() else "is a file" if not run_dir.is_dir() else \
            "holds no config.yaml or template.json"
        raise FileNotFoundError(f"{run_dir} is not a fewtune run directory ({what}): give the folder `fewtune train` wrote")
    cfg, _ = check_run_dir(run_dir)  # format, config.yaml, template.json, tokenizer/: before the weights are loaded
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--merged {out_dir} is a file: give a folder for the merged model")
    from fewtune.methods import check_mergeable, get_method

    method = cfg.method.name
    if not get_method(method).mergeable:  # said before the model is loaded, from the method's registry entry
        from fewtune.methods import MethodError

        raise MethodError(f"a {method} run cannot be merged into a plain model: its virtual tokens are not weights "
                          "of the base. Use the run directory itself with `fewtune generate RUN_DIR`.")
    loaded = load_for_inference(str(run_dir), precision="no")  # exports stay float32
    model = loaded.model
    check_mergeable(model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    loaded.tokenizer.save_pretrained(out_dir)
    if loaded.vision is not None:  # a vision-language model's image processor: the merged folder loads alone
        loaded.vision.save(out_dir)
    loaded.template.save(out_dir / "template.json")
    log.info("merged model written to %s", out_dir)
    return out_dir
