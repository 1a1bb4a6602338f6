"""fewtune ui: the schema-generated form, the training job, and the whole page in a real browser.

The browser test drives headless Chromium (Debian's `chromium`, which `make browser` installs; no
browser is downloaded) with Playwright. It is skipped, saying what to install, when either is missing.
Set FEWTUNE_UI_SCREENSHOTS=FOLDER to keep a screenshot of each tab.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from fewtune.config import Config, ConfigError
from fewtune.ui.form import NONE_CHOICE, from_widget, schema_fields, to_config, widget_values

from tests.conftest import write_jsonl


def _leaves(model, prefix=""):
    from fewtune.config import section_class

    for name, info in model.model_fields.items():
        sub = section_class(info.annotation)
        yield from (_leaves(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"])


def test_form_has_every_config_key_once():
    keys = [f.key for f in schema_fields()]
    assert len(keys) == len(set(keys))
    assert keys == list(_leaves(Config))  # the schema's order, nothing left out
    kinds = {f.key: f.kind for f in schema_fields()}
    assert kinds["train.packing"] == "bool"
    assert kinds["train.batch_size"] == "int"
    assert kinds["train.weight_decay"] == "float"
    assert kinds["train.scheduler"] == "choice"
    assert kinds["train.lr"] == "yaml"  # may be null: edited as YAML text
    assert kinds["method.lora.target_modules"] == "yaml"  # str or list
    assert kinds["model.name"] == "text"


def test_form_round_trips_the_defaults_and_a_changed_config():
    fields = schema_fields()
    assert to_config(fields, widget_values(fields, Config())) == Config()
    changed = Config.model_validate({"train": {"lr": 3e-4, "epochs": 2, "report_to": ["tensorboard"]},
                                     "method": {"lora": {"target_modules": ["q_proj", "v_proj"]}},
                                     "data": {"system_prompt": "分类：正面或负面", "train": "d.jsonl"},
                                     "eval": {"task": "classification"}})
    values = widget_values(fields, changed)
    assert to_config(fields, values) == changed
    task = next(i for i, f in enumerate(fields) if f.key == "eval.task")
    assert values[task] == "classification"
    values[task] = NONE_CHOICE
    assert to_config(fields, values).eval.task is None


def test_form_errors_name_the_key():
    fields = schema_fields()
    values = widget_values(fields, Config())
    batch = next(i for i, f in enumerate(fields) if f.key == "train.batch_size")
    values[batch] = 0
    with pytest.raises(ConfigError, match="batch_size"):
        to_config(fields, values)
    lr = next(f for f in fields if f.key == "train.lr")
    with pytest.raises(ConfigError, match="train.lr: not valid YAML"):
        from_widget(lr, "[1, 2")
    with pytest.raises(ConfigError, match="whole number"):
        from_widget(next(f for f in fields if f.key == "train.batch_size"), 2.5)


def _ui_data(folder: Path) -> Path:
    rows = []
    for i in range(12):
        rows.append({"text": f"这部电影很好看，第{i}次推荐", "label": "正面"})
        rows.append({"text": f"The service was slow and rude, visit {i}", "label": "negative"})
    (folder / "data").mkdir(parents=True, exist_ok=True)
    return write_jsonl(folder / "data" / "train.jsonl", rows)


def test_training_job_runs_reports_progress_and_stops(tmp_path, tiny_model):
    from fewtune.ui.jobs import TrainingJob

    _ui_data(tmp_path)
    cfg = Config.model_validate({"model": {"name": tiny_model}, "data": {"train": "data/train.jsonl", "val_ratio": 0.2},
                                 "train": {"output_dir": "runs/one", "max_steps": 4, "batch_size": 4,
                                           "cache_tokenized": False, "adapt_threads": False},
                                 "eval": {"every": 2}})
    job = TrainingJob(tmp_path)
    assert job.progress().state == "idle"
    run_dir = job.start(cfg)
    assert job.wait(300) == 0, job.log_tail()
    progress = job.progress()
    assert progress.state == "finished" and progress.run_dir == str(run_dir)
    assert progress.step == 4 and progress.total_steps == 4
    assert [c["series"] for c in progress.curve].count("training") == 4
    assert "validation" in {c["series"] for c in progress.curve}
    assert (run_dir / "adapter" / "adapter_config.json").is_file() or any(run_dir.glob("**/adapter_config.json"))
    with pytest.raises(FileExistsError, match="already holds a run"):
        job.start(cfg)

    # a long run stopped half-way: SIGTERM, a checkpoint, the state says how to resume
    long = cfg.model_copy(update={"train": cfg.train.model_copy(update={"output_dir": "runs/two", "max_steps": 500})})
    run_dir = job.start(long)
    deadline = time.time() + 120
    while job.progress().step < 2 and time.time() < deadline and job.running:
        time.sleep(0.2)
    assert job.stop()
    assert job.wait(120) == 143, job.log_tail()
    progress = job.progress()
    assert progress.state == "stopped" and "--resume" in progress.message
    assert any((run_dir / "checkpoints").iterdir())


def test_evaluate_tab_one_model_and_a_comparison(tmp_path, tiny_models):
    from fewtune.ui.app import UIError, evaluate_targets

    data = _ui_data(tmp_path)
    rows, images, disagree, note = evaluate_targets(tmp_path, [tiny_models["llama"]], "data/train.jsonl", 10,
                                                    tmp_path / "out")
    metrics = {r[0]: r[1:] for r in rows}
    assert "accuracy" in metrics and len(metrics["accuracy"]) == 1
    value, interval = metrics["accuracy"][0].split(" ", 1)
    low, high = (float(x) for x in interval.strip("[]").split(", "))
    assert low <= float(value) <= high
    assert len(images) == 1 and Path(images[0]).stat().st_size > 0 and disagree == []
    assert "10 examples" in note

    rows, images, disagree, note = evaluate_targets(tmp_path, [tiny_models["llama"], tiny_models["qwen2"]],
                                                    str(data), None, tmp_path / "out")
    assert all(len(r) == 3 for r in rows) and len(images) == 2
    assert "24 examples" in note and "disagree on" in note
    assert all(len(d) == 5 for d in disagree)
    with pytest.raises(UIError, match="choose at least one"):
        evaluate_targets(tmp_path, [], "data/train.jsonl", None, tmp_path / "out")
    with pytest.raises(UIError, match="not found"):
        evaluate_targets(tmp_path, [tiny_models["llama"]], "data/missing.jsonl", None, tmp_path / "out")


# ----------------------------------------------------------------------------------- the browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser_page():
    pytest.importorskip("gradio", reason="the web UI needs Gradio: pip install 'fewtune[ui]'")
    playwright_api = pytest.importorskip("playwright.sync_api",
                                         reason="the browser test needs Playwright: pip install playwright")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("the browser test needs Chromium: sudo apt-get install chromium (or make browser)")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        try:
            yield page
        finally:
            browser.close()


def _shot(page, name: str) -> None:
    folder = os.environ.get("FEWTUNE_UI_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"ui-{name}.png"), full_page=False)


def _fill(page, elem_id: str, text: str) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(text)
    box.blur()


def test_ui_in_a_real_browser(tmp_path, tiny_model, browser_page):
    """Open the UI, check a data file, train a few steps and watch the curve appear, chat one turn."""
    from fewtune.ui.app import build_app, theme

    import gradio as gr

    _ui_data(tmp_path)
    app = build_app(tmp_path)
    port = _free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False,
                       theme=theme(gr), quiet=True)
    page = browser_page
    requests_out = []
    page.on("request", lambda r: requests_out.append(r.url) if not r.url.startswith(
        (f"http://127.0.0.1:{port}", "data:", "blob:")) else None)
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        # Data: check the fixture file with the tiny model's tokenizer
        _fill(page, "data-path", "data/train.jsonl")
        _fill(page, "data-model", tiny_model)
        page.click("#data-check")
        summary = page.locator("#data-summary")
        summary.get_by_text("24 examples", exact=False).wait_for()
        page.locator("#data-lengths img").wait_for()
        assert "0 errors, 1 warnings" in summary.inner_text()
        assert "正面 12" in summary.inner_text()
        assert "only 24 usable examples" in page.locator("#data-findings").inner_text()
        page.locator("#data-preview").get_by_text("这部电影很好看", exact=False).first.wait_for()
        _shot(page, "data")

        # Train: the schema form, a few steps, the loss curve drawn
        page.get_by_role("tab", name="Train").click()
        _fill(page, "cfg-model-name", tiny_model)
        _fill(page, "cfg-data-train", "data/train.jsonl")
        _fill(page, "cfg-train-output-dir", "runs/from-ui")
        _fill(page, "cfg-train-max-steps", "6")
        page.click("#train-start")
        status = page.locator("#train-status")
        status.get_by_text("finished", exact=False).wait_for(timeout=240_000)
        page.locator("#train-curve canvas, #train-curve svg").first.wait_for()
        assert "runs/from-ui" in status.inner_text()
        assert (tmp_path / "runs" / "from-ui" / "metrics.jsonl").is_file()
        _shot(page, "train")

        # Chat: one turn with the run just trained
        page.get_by_role("tab", name="Chat").click()
        _fill(page, "chat-target", "runs/from-ui")
        _fill(page, "chat-message", "这部电影怎么样？")
        page.click("#chat-send")
        bot = page.locator("#chat-box .bot, #chat-box [data-testid='bot']").first
        bot.wait_for(timeout=120_000)
        assert page.locator("#chat-box").get_by_text("这部电影怎么样？").count() >= 1
        assert page.locator("#chat-error").inner_text().strip() == ""
        _shot(page, "chat")
        assert not requests_out, f"the page fetched from the network: {requests_out[:5]}"
    finally:
        app.close()
        app.fewtune_job.stop()
