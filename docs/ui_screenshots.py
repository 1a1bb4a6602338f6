"""The screenshots of `fewtune ui` in docs/ (README's UI section), taken in headless Chromium.

    python docs/ui_screenshots.py            # writes docs/ui-data.png, ui-train.png, ui-evaluate.png, ui-chat.png

A real session on the embedded default model: the Data tab checks FewCLUE eprstmt (Chinese reviews),
the Train tab fine-tunes SmolLM2-135M on 40 SNIPS utterances per intent for 100 steps (about 3 epochs), the Evaluate
tab compares the base model with that run on 70 further utterances (10 per intent), and the Chat tab asks the run
one question. Needs ../shared/data (SNIPS, FewCLUE), Gradio, Playwright and Debian's chromium with
fonts-noto-cjk (`make browser`); about three minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DOCS), help="folder for the PNG files")
    parser.add_argument("--port", type=int, default=7877)
    args = parser.parse_args()

    import gradio as gr
    from playwright.sync_api import sync_playwright

    from fewtune.datasets.fewclue import write_splits
    from fewtune.datasets.snips import SYSTEM_PROMPT, find_snips, write_intent_splits
    from fewtune.models import DEFAULT_MODEL
    from fewtune.ui.app import build_app, theme

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Chromium: sudo apt-get install chromium fonts-noto-cjk (or make browser)")
    work = Path(tempfile.mkdtemp(prefix="fewtune-ui-shots-"))
    write_intent_splits(find_snips(), work / "data" / "snips", per_intent=40, dev_per_intent=10)
    write_splits("eprstmt", work / "data" / "eprstmt")
    out = Path(args.out)
    app = build_app(work)
    app.queue().launch(server_name="127.0.0.1", server_port=args.port, prevent_thread_lock=True, quiet=True,
                       theme=theme(gr))

    def fill(page, elem_id: str, text: str) -> None:
        box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
        box.fill(text)
        box.blur()

    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(600_000)
            page.goto(f"http://127.0.0.1:{args.port}/")

            fill(page, "data-path", "data/eprstmt/train.jsonl")
            page.click("#data-check")
            page.locator("#data-lengths img").wait_for()
            time.sleep(1)
            page.screenshot(path=str(out / "ui-data.png"), full_page=True)

            page.get_by_role("tab", name="Train").click()
            fill(page, "cfg-model-name", DEFAULT_MODEL)
            fill(page, "cfg-data-train", "data/snips/train.jsonl")
            fill(page, "cfg-train-output-dir", "runs/snips-ui")
            fill(page, "cfg-train-max-steps", "100")
            page.get_by_text("eval", exact=True).first.click()  # open the eval section
            fill(page, "cfg-eval-every", "20")
            page.click("#train-start")
            page.locator("#train-status").get_by_text("finished", exact=False).wait_for()
            time.sleep(2)
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(out / "ui-train.png"))

            page.get_by_role("tab", name="Evaluate").click()
            targets = page.locator("#eval-targets input").first
            for target in (DEFAULT_MODEL, "runs/snips-ui"):
                targets.fill(target)
                targets.press("Enter")
            fill(page, "eval-data", "data/snips/dev.jsonl")  # 10 further utterances per intent
            page.click("#eval-run")
            page.locator("#eval-confusion img").first.wait_for()
            time.sleep(1)
            page.screenshot(path=str(out / "ui-evaluate.png"), full_page=True)

            page.get_by_role("tab", name="Chat").click()
            fill(page, "chat-target", "runs/snips-ui")
            fill(page, "chat-system", SYSTEM_PROMPT)  # SNIPS examples carry it in the data, not in the config
            fill(page, "chat-message", "play something by miles davis on spotify")
            page.click("#chat-send")
            page.locator("#chat-box .bot, #chat-box [data-testid='bot']").first.wait_for()
            time.sleep(1)
            page.screenshot(path=str(out / "ui-chat.png"))
            browser.close()
    finally:
        app.close()
        app.fewtune_job.stop()
    print(f"screenshots in {out}; the session's files in {work}")


if __name__ == "__main__":
    main()
