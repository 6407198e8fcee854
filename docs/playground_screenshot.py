"""Take the screenshot of docs/playground.md: a real exchange in the playground, in headless Chromium.

    python docs/playground_screenshot.py --model support-bot@challenger --prompt "How do I turn on 2FA?"

Starts `mlflow-finetune playground` on 127.0.0.1 against the current tracking store (MLFLOW_TRACKING_URI or
./mlflow.db), sends one prompt with the pre-filled system prompt, waits for both answers and saves the page as
docs/img/playground.png. Needs Debian's chromium and the playwright package (the test extra).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

OUT = Path(__file__).resolve().parent / "img" / "playground.png"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="support-bot@challenger")
    p.add_argument("--against", default="base")
    p.add_argument("--prompt", default="How do I turn on two-factor authentication?")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)

    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([shutil.which("mlflow-finetune") or "mlflow-finetune", "playground", "--model",
                             args.model, "--against", args.against, "--port", str(port)])
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit("the playground did not start") from None
                time.sleep(1)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                         args=["--no-sandbox", "--disable-gpu",
                                               "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#chat-b")
            page.locator("#prompt textarea").fill(args.prompt)
            page.locator("#send").click()
            page.wait_for_function("document.querySelector('#status').innerText.includes('Vote below')",
                                   timeout=300_000)
            answers = [page.locator(f"#chat-{s} [data-testid=bot]").last.inner_text() for s in "ab"]
            page.screenshot(path=args.out, full_page=True)
            browser.close()
        print(f"saved {args.out}\nA: {answers[0]}\nB: {answers[1]}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
